-- usage: a budget's state in its current window (purging expired holds first).
-- KEYS: 8 (see the prelude).
-- ARGV[1] period ms   ARGV[2] default limit   ARGV[3] tombstone horizon ms
-- Returns {now, window, limit, spent, held, live holds, purged, {expired ids}}
local period = tonumber(ARGV[1])
local limit_default = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
if #KEYS ~= 8 or period == nil or limit_default == nil or horizon == nil then
  return redis.error_reply('ERR budget usage: bad arguments')
end
local now = now_ms()
local ids = {}
local purged, purge_at = purge(1, now, horizon, 2 * horizon, ids)
if purged > 0 then
  local _, armed = parse_meta(redis.call('GET', KEYS[8]))
  if armed > now then
    write_meta(1, purge_at, armed, armed - now)
  end
end
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
