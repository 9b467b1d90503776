-- extend: renew the leases of one in-flight reservation's holds.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] lease ms   ARGV[3] tombstone horizon ms
-- then 1 per budget: amount held
-- A hold that expired meanwhile (a tombstone) is held again: the request is still running.
-- Returns {renewed, reheld, missing}
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local n = #KEYS
if lease == nil or horizon == nil or n < 1 or #ARGV ~= 3 + n then
  return redis.error_reply('ERR budget extend: bad arguments')
end
for i = 1, n do
  local amount = tonumber(ARGV[3 + i])
  if amount == nil or amount < 0 or amount ~= math.floor(amount) then
    return redis.error_reply('ERR budget extend: bad arguments')
  end
end
local now = now_ms()
local expiry = now + lease
local hold, tombstone = 'h:' .. id, 't:' .. id
local renewed, reheld, missing = 0, 0, 0
for i = 1, n do
  local key = KEYS[i]
  local amount = int(tonumber(ARGV[3 + i]))
  local v = redis.call('HMGET', key, hold, 'ttl', 'pa', 'pm')
  local found = true
  if v[1] then
    renewed = renewed + 1
  elseif redis.call('HDEL', key, tombstone) == 1 then
    redis.call('HINCRBY', key, 'held', amount)
    reheld = reheld + 1
  else
    missing = missing + 1
    found = false
  end
  if found then
    local writes = {hold, int(expiry) .. ':' .. amount}
    -- A held-again hold may now be the first to expire (a renewed one expires later than before).
    due_by(expiry, tonumber(v[3]), tonumber(v[4]), writes)
    local expire_at = arm(tonumber(v[2]) or 0, expiry, horizon, 0, 0, writes)
    redis.call('HSET', key, unpack(writes))
    if expire_at then
      redis.call('PEXPIREAT', key, int(expire_at))
    end
  end
end
return {renewed, reheld, missing}
