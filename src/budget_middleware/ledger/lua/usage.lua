-- usage: a budget's state in its current window, a bounded step at a time.
-- KEYS: the budget's hash (see the prelude).
-- ARGV[1] period ms   ARGV[2] default limit   ARGV[3] tombstone horizon ms
-- ARGV[4] the HSCAN cursor of a count of the live holds: '0' to start one, '' to count none
-- Takes one step of the purge pass when one is due or under way (as a reserve does), then, when
-- asked, counts the live holds in one HSCAN batch from ARGV[4]. Bounded work, as every script: a
-- caller that wants the whole picture calls it until no pass is under way, then until the count's
-- cursor comes back '0' (RedisLedger.usage).
-- Returns {now, window, limit, spent, held, purged, pass under way 1|0, live holds counted, cursor}
-- (the cursor '' when no count was asked for)
local COUNT_BATCH = 256
local period = tonumber(ARGV[1])
local limit_default = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local cursor = ARGV[4]
if #KEYS ~= 1 or #ARGV ~= 4 or period == nil or limit_default == nil or horizon == nil
    or not (cursor == '' or string.find(cursor, '^%d+$')) then
  return redis.error_reply('ERR budget usage: bad arguments')
end
local key = KEYS[1]
local now = now_ms()
local window = window_of(now, period)
local v = redis.call('HMGET', key, 'held', 'limit', 's:' .. int(window), 'ttl', 'pa')
local held = tonumber(v[1]) or 0
local pa = tonumber(v[5]) or NEVER -- every hash has `pa` once it has a hold
local purged = 0
if pa <= now then
  local writes, released = {}, 0
  purged, released, pa = pass_step(key, pa, now, horizon, period, {}, writes)
  held = held - released
  -- Tombstones left by the purge live a horizon from now.
  local expire_at = nil
  if purged > 0 then
    expire_at = arm(tonumber(v[4]) or 0, now, horizon, 0, 0, writes)
  end
  redis.call('HSET', key, unpack(writes))
  if expire_at then
    redis.call('PEXPIREAT', key, int(expire_at))
  end
end
if held < 0 then
  held = 0
end
local live = 0
if cursor ~= '' then
  local scan = redis.call('HSCAN', key, cursor, 'MATCH', 'h:*', 'COUNT', COUNT_BATCH)
  local kv = scan[2]
  for i = 2, #kv, 2 do
    local value = kv[i]
    if tonumber(string.sub(value, 1, string.find(value, ':', 1, true) - 1)) > now then
      live = live + 1
    end
  end
  cursor = scan[1]
end
local limit = tonumber(v[2]) or limit_default
return {now, window, limit, tonumber(v[3]) or 0, held, purged, pa == 0 and 1 or 0, live, cursor}
