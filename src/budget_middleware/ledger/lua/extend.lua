-- extend: renew the leases of one in-flight reservation's holds.
-- KEYS: 8 per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] lease ms   ARGV[3] tombstone horizon ms
-- then 1 per budget: amount held
-- A hold that expired meanwhile (a tombstone) is held again: the request is still running.
-- Returns {renewed, reheld, missing}
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local n = #KEYS / 8
if lease == nil or horizon == nil or n < 1 or n ~= math.floor(n) or #ARGV ~= 3 + n then
  return redis.error_reply('ERR budget extend: bad arguments')
end
for i = 1, n do
  if tonumber(ARGV[3 + i]) == nil then
    return redis.error_reply('ERR budget extend: bad arguments')
  end
end
local now = now_ms()
local ttl = arm_ttl(lease, horizon)
local expiry = now + lease
local renewed, reheld, missing = 0, 0, 0
for i = 1, n do
  local k = 8 * (i - 1) + 1
  local member = id .. '|' .. ARGV[3 + i]
  local found = true
  if redis.call('ZSCORE', KEYS[k + 1], member) then
    redis.call('ZADD', KEYS[k + 1], int(expiry), member)
    renewed = renewed + 1
  elseif redis.call('ZREM', KEYS[k + 2], member) == 1 then
    redis.call('ZADD', KEYS[k + 1], int(expiry), member)
    redis.call('INCRBY', KEYS[k], ARGV[3 + i])
    reheld = reheld + 1
    -- The held-again hold may now be the earliest to expire: move the purge hint.
    local purge_at, armed = parse_meta(redis.call('GET', KEYS[k + 7]))
    if expiry < purge_at or purge_at == 0 then
      purge_at = expiry
    end
    write_meta(k, purge_at, now + ttl, ttl)
  else
    missing = missing + 1
    found = false
  end
  if found then
    arm(k, ttl)
  end
end
return {renewed, reheld, missing}
