-- limit: set or clear a budget's per-entity limit override.
-- KEYS: the budget's hash (see the prelude).
-- ARGV[1] the limit (micro-units), or '' to clear it   ARGV[2] period ms   ARGV[3] horizon ms
-- An override is an operator's setting: while it is set the hash has no TTL. Cleared, the hash
-- gets one again (its spend kept until its window ends), re-armed as usual by the next reserve,
-- unless it holds a lifetime budget's spend.
local limit = ARGV[1]
local period = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
-- An override is stored as an integer as Redis writes them (reserve's common case hands it back as
-- it is stored), of at most 2^53 - 1.
if #KEYS ~= 1 or period == nil or horizon == nil or not (limit == '' or limit == '0'
    or (string.find(limit, '^[1-9]%d*$') and limit + 0 <= NEVER)) then
  return redis.error_reply('ERR budget limit: bad arguments')
end
local key = KEYS[1]
if limit ~= '' then
  redis.call('HSET', key, 'limit', limit, 'ttl', '-1')
  redis.call('PERSIST', key)
  return 1
end
if redis.call('HDEL', key, 'limit') == 1 then
  if redis.call('HLEN', key) == 1 then
    -- Only the `ttl` field is left: an override set and cleared on a budget nobody used.
    redis.call('DEL', key)
    return 0
  end
  if period == 0 and redis.call('HEXISTS', key, 's:0') == 1 then
    return 0 -- a lifetime budget's spend stays its record
  end
  local now = now_ms()
  local expire_at = now + 2 * horizon
  if period > 0 then
    expire_at = math.max(expire_at, window_of(now, period) + period + horizon)
  end
  redis.call('HSET', key, 'ttl', int(expire_at))
  redis.call('PEXPIREAT', key, int(expire_at))
end
return 0
