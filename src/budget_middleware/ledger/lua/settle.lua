-- settle: end one reservation exactly once; remove its holds and add the actual cost to spent.
-- KEYS: 8 per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] actual (micro-units)   ARGV[3] tombstone horizon ms
-- ARGV[4] the id's creation time ms
-- then 4 per budget: amount held, window (-1: the reserve's reply never came, release only),
--   epoch returned by the reserve, period ms
-- Returns {outcome per budget...}: applied | late | recovered | duplicate | stale
local id = ARGV[1]
local actual = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local id_time = tonumber(ARGV[4])
local n = #KEYS / 8
if actual == nil or actual < 0 or horizon == nil or id_time == nil or n < 1
    or n ~= math.floor(n) or #ARGV ~= 4 + 4 * n then
  return redis.error_reply('ERR budget settle: bad arguments')
end
for i = 1, n do
  local a = 4 + 4 * (i - 1)
  local window = tonumber(ARGV[a + 2])
  if tonumber(ARGV[a + 1]) == nil or window == nil or tonumber(ARGV[a + 4]) == nil
      or (window < 0 and actual ~= 0) then
    return redis.error_reply('ERR budget settle: bad arguments')
  end
end

local out = {}
for i = 1, n do
  local k = 8 * (i - 1) + 1
  local a = 4 + 4 * (i - 1)
  local window = tonumber(ARGV[a + 2])
  local epoch = ARGV[a + 3]
  local period = tonumber(ARGV[a + 4])
  local member = id .. '|' .. ARGV[a + 1]
  local outcome
  if redis.call('ZREM', KEYS[k + 1], member) == 1 then
    redis.call('DECRBY', KEYS[k], ARGV[a + 1])
    outcome = 'applied'
  elseif redis.call('ZREM', KEYS[k + 2], member) == 1 then
    outcome = 'late'
  elseif window < 0 then
    outcome = 'duplicate'
  else
    local now = now_ms()
    local old = id_time < now - horizon
    if redis.call('GET', KEYS[k + 3]) == epoch then
      if old then outcome = 'stale' else outcome = 'duplicate' end
    elseif redis.call('ZSCORE', KEYS[k + 5], id) then
      outcome = 'duplicate'
    elseif old then
      outcome = 'stale'
    else
      -- The state this settle would have found is gone (a restart without persistence, a
      -- failover that lost writes): the spend happened, so apply it, and remember the id for
      -- its own retries.
      outcome = 'recovered'
      redis.call('ZADD', KEYS[k + 5], int(now), id)
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', int(now - horizon))
      redis.call('PEXPIRE', KEYS[k + 5], int(horizon))
    end
  end
  if actual > 0 and window >= 0 and outcome ~= 'duplicate' and outcome ~= 'stale' then
    add_spent(k, window, actual, period)
  end
  out[i] = outcome
end
return out
