-- extend: renew the leases of one in-flight reservation's holds.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] lease ms   ARGV[3] tombstone horizon ms
-- The amount renewed is the one stored with the hold, or with its tombstone: the caller sends none.
-- A hold that expired meanwhile (a tombstone) is held again: the request is still running. A
-- tombstone without an amount (written by an older version) is left for the settle to find late.
-- Returns {renewed, reheld, missing}
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local n = #KEYS
if lease == nil or horizon == nil or n < 1 or #ARGV ~= 3 then
  return redis.error_reply('ERR budget extend: bad arguments')
end
local now = now_ms()
local expiry = now + lease
local hold, tombstone = 'h:' .. id, 't:' .. id
local renewed, reheld, missing = 0, 0, 0
for i = 1, n do
  local key = KEYS[i]
  local v = redis.call('HMGET', key, hold, tombstone, 'ttl', 'pa', 'pm')
  -- A hold is '<lease expiry>:<amount>', a tombstone '<purge time>:<amount>'.
  local amount = nil
  if v[1] then
    amount = string.sub(v[1], string.find(v[1], ':', 1, true) + 1)
    renewed = renewed + 1
  elseif v[2] and string.find(v[2], ':', 1, true) then
    amount = string.sub(v[2], string.find(v[2], ':', 1, true) + 1)
    redis.call('HDEL', key, tombstone)
    redis.call('HINCRBY', key, 'held', amount)
    reheld = reheld + 1
  else
    missing = missing + 1
  end
  if amount then
    local writes = {hold, int(expiry) .. ':' .. amount}
    -- A held-again hold may now be the first to expire (a renewed one expires later than before).
    due_by(expiry, tonumber(v[4]), tonumber(v[5]), writes)
    local expire_at = arm(tonumber(v[3]) or 0, expiry, horizon, 0, 0, writes)
    redis.call('HSET', key, unpack(writes))
    if expire_at then
      redis.call('PEXPIREAT', key, int(expire_at))
    end
  end
end
return {renewed, reheld, missing}
