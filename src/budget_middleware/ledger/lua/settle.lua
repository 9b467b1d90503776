-- settle: end one reservation exactly once; remove its holds and add the actual cost to spent.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] actual (micro-units)   ARGV[3] tombstone horizon ms
-- ARGV[4] the id's creation time ms
-- then 4 per budget: amount held, window (-1: the reserve's reply never came, release only),
--   epoch returned by the reserve, period ms
-- Returns {outcome per budget...}: applied | late | recovered | duplicate | stale
local id = ARGV[1]
local actual = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local id_time = tonumber(ARGV[4])
local n = #KEYS
if actual == nil or actual < 0 or actual ~= math.floor(actual) or horizon == nil or id_time == nil or n < 1 or #ARGV ~= 4 + 4 * n then
  return redis.error_reply('ERR budget settle: bad arguments')
end
local amounts, windows, periods = {}, {}, {}
for i = 1, n do
  local a = 4 + 4 * (i - 1)
  amounts[i], windows[i], periods[i] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 4])
  if amounts[i] == nil or amounts[i] < 0 or amounts[i] ~= math.floor(amounts[i]) or windows[i] == nil
      or windows[i] ~= math.floor(windows[i]) or periods[i] == nil
      or (windows[i] < 0 and actual ~= 0) then
    return redis.error_reply('ERR budget settle: bad arguments')
  end
end

local hold, tombstone, done = 'h:' .. id, 't:' .. id, 'd:' .. id
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local window, period = windows[i], periods[i]
  local outcome
  if redis.call('HDEL', key, hold) == 1 then
    if amounts[i] > 0 then
      redis.call('HINCRBY', key, 'held', int(-amounts[i]))
    end
    outcome = 'applied'
  elseif redis.call('HDEL', key, tombstone) == 1 then
    outcome = 'late'
  elseif window < 0 then
    outcome = 'duplicate'
  else
    local now = now_ms()
    local old = id_time < now - horizon
    local st = redis.call('HMGET', key, 'epoch', done, 'ttl', 'pa', 'pm')
    if st[1] == ARGV[4 * i + 3] then -- the epoch the reserve returned
      if old then outcome = 'stale' else outcome = 'duplicate' end
    elseif st[2] then
      outcome = 'duplicate'
    elseif old then
      outcome = 'stale'
    else
      -- The state this settle would have found is gone (a restart without persistence, a
      -- failover that lost writes): the spend happened, so apply it, and remember the id for
      -- its own retries.
      outcome = 'recovered'
      local writes = {done, int(now)}
      -- The done record is swept after the horizon: the next purge pass must come by then.
      due_by(now + horizon, tonumber(st[4]), tonumber(st[5]), writes)
      local expire_at = arm(tonumber(st[3]) or 0, now, horizon, window, period, writes)
      redis.call('HSET', key, unpack(writes))
      if expire_at then
        redis.call('PEXPIREAT', key, int(expire_at))
      end
    end
  end
  if actual > 0 and window >= 0 and outcome ~= 'duplicate' and outcome ~= 'stale' then
    if redis.call('HINCRBY', key, 's:' .. int(window), int(actual)) == actual and period == 0 then
      -- The first spend of a lifetime budget: from now on the hash is its record, with no TTL.
      redis.call('HSET', key, 'ttl', '-1')
      redis.call('PERSIST', key)
    end
  end
  out[i] = outcome
end
return out
