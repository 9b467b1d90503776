-- reset: clear a budget's spend in its current window.
-- KEYS: the budget's hash (see the prelude).   ARGV[1] period ms
-- Returns the window that was cleared.
local period = tonumber(ARGV[1])
if #KEYS ~= 1 or period == nil then
  return redis.error_reply('ERR budget reset: bad arguments')
end
local window = window_of(now_ms(), period)
redis.call('HDEL', KEYS[1], 's:' .. int(window))
return window
