-- usage: a budget's state in its current window, after a whole purge pass.
-- KEYS: the budget's hash (see the prelude).
-- ARGV[1] period ms   ARGV[2] default limit   ARGV[3] tombstone horizon ms
-- Returns {now, window, limit, spent, held, live holds, purged, {expired ids}}
-- An operator's call, not a request's: it scans every field of the budget to count its live holds.
local period = tonumber(ARGV[1])
local limit_default = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
if #KEYS ~= 1 or period == nil or limit_default == nil or horizon == nil then
  return redis.error_reply('ERR budget usage: bad arguments')
end
local key = KEYS[1]
local now = now_ms()
local window = window_of(now, period)
local ids, writes, seen = {}, {}, {}
local purged, live = 0, 0
local cursor, due = '0', NEVER
repeat
  local moved, _, count
  moved, _, cursor, due, count = purge_step(key, cursor, due, now, horizon, period, ids, writes, seen)
  purged = purged + moved
  live = live + count
until cursor == '0'
local v = redis.call('HMGET', key, 'held', 'limit', 's:' .. int(window), 'ttl')
if v[4] then
  -- A whole pass ran: it replaces one that was in progress. Its tombstones live a horizon.
  pass_state('0', due, writes, key)
  local expire_at = nil
  if purged > 0 then
    expire_at = arm(tonumber(v[4]), now, horizon, 0, 0, writes)
  end
  redis.call('HSET', key, unpack(writes))
  if expire_at then
    redis.call('PEXPIREAT', key, int(expire_at))
  end
end
local held = tonumber(v[1]) or 0
if held < 0 then
  held = 0
end
local limit = tonumber(v[2]) or limit_default
return {now, window, limit, tonumber(v[3]) or 0, held, live, purged, ids}
