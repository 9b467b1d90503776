-- usage: a budget's state in its current window (purging expired holds first).
-- KEYS: 7 (see the prelude).
-- ARGV[1] period ms   ARGV[2] default limit   ARGV[3] tombstone horizon ms   ARGV[4] lease ms
-- Returns {now, window, limit, spent, held, live holds, purged, {expired ids}}
local period = tonumber(ARGV[1])
local limit_default = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
if #KEYS ~= 7 or period == nil or limit_default == nil or horizon == nil or lease == nil then
  return redis.error_reply('ERR budget usage: bad arguments')
end
local now = now_ms()
local ids = {}
local purged = purge(1, now, horizon, lease + horizon, ids)
local window = 0
if period > 0 then
  window = now - now % period
end
local held = tonumber(redis.call('GET', KEYS[1])) or 0
if held < 0 then
  held = 0
end
local limit = tonumber(redis.call('GET', KEYS[5])) or limit_default
local spent = tonumber(redis.call('HGET', KEYS[7], int(window))) or 0
return {now, window, limit, spent, held, redis.call('ZCARD', KEYS[2]), purged, ids}
