-- reset: clear a budget's spend in its current window.
-- KEYS: 8 (see the prelude).   ARGV[1] period ms
-- Returns the window that was cleared.
local period = tonumber(ARGV[1])
if #KEYS ~= 8 or period == nil then
  return redis.error_reply('ERR budget reset: bad arguments')
end
local now = now_ms()
local window = 0
if period > 0 then
  window = now - now % period
end
redis.call('HDEL', KEYS[7], int(window))
return window
