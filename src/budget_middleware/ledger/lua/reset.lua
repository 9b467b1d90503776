-- reset: clear a budget's spend in its current window.
-- KEYS: the budget's hash (see the prelude).   ARGV[1] period ms   ARGV[2] horizon ms
-- Returns the window that was cleared.
local period = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
if #KEYS ~= 1 or period == nil or horizon == nil then
  return redis.error_reply('ERR budget reset: bad arguments')
end
local now = now_ms()
local window = window_of(now, period)
if redis.call('HDEL', KEYS[1], 's:' .. int(window)) == 1 and period == 0 then
  -- A lifetime budget kept for its spend, and without an override, expires again when idle.
  local v = redis.call('HMGET', KEYS[1], 'limit', 'ttl')
  if not v[1] and v[2] == '-1' then
    redis.call('HSET', KEYS[1], 'ttl', int(now + 2 * horizon))
    redis.call('PEXPIREAT', KEYS[1], int(now + 2 * horizon))
  end
end
return window
