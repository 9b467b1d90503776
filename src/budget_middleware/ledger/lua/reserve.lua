-- reserve: take one hold on every budget, all or nothing.
-- KEYS: 7 per budget (see the prelude).
-- ARGV[1] reservation id   ARGV[2] lease ms   ARGV[3] tombstone horizon ms
-- ARGV[4] a fresh epoch token, used by budgets that have none
-- then 3 per budget: period ms (0 = lifetime), default limit, amount (micro-units)
-- Returns {status, now, purged, {expired ids}, rows...}
--   status 1 admitted, 2 admitted before (a retried reserve: nothing added); a row per budget:
--     {window, epoch, limit, remaining after}
--   status 0 rejected; a row per budget: {window, limit, spent, held, admissible 1|0}
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local fresh_epoch = ARGV[4]
local n = #KEYS / 7
if lease == nil or horizon == nil or n < 1 or n ~= math.floor(n) or #ARGV ~= 4 + 3 * n then
  return redis.error_reply('ERR budget reserve: bad arguments')
end
for i = 1, n do
  local a = 4 + 3 * (i - 1)
  if tonumber(ARGV[a + 1]) == nil or tonumber(ARGV[a + 2]) == nil or tonumber(ARGV[a + 3]) == nil then
    return redis.error_reply('ERR budget reserve: bad arguments')
  end
end

local now = now_ms()
local ttl = lease + horizon
local ids = {}
local purged = 0
for i = 1, n do
  purged = purged + purge(7 * (i - 1) + 1, now, horizon, ttl, ids)
end

local first = id .. '|' .. ARGV[7]
local replay = redis.call('ZSCORE', KEYS[2], first) or redis.call('ZSCORE', KEYS[3], first)

local rows = {}
local rejected = false
for i = 1, n do
  local k = 7 * (i - 1) + 1
  local a = 4 + 3 * (i - 1)
  local period = tonumber(ARGV[a + 1])
  local limit_default = tonumber(ARGV[a + 2])
  local amount = tonumber(ARGV[a + 3])
  local window = 0
  if period > 0 then
    window = now - now % period
  end
  local vals = redis.call('MGET', KEYS[k], KEYS[k + 3], KEYS[k + 4])
  local held = tonumber(vals[1]) or 0
  if held < 0 then
    held = 0
  end
  local limit = tonumber(vals[3]) or limit_default
  local spent = tonumber(redis.call('HGET', KEYS[k + 6], int(window))) or 0
  local ok = (limit - spent - held > 0) and (spent + held + amount <= limit)
  if not ok then
    rejected = true
  end
  rows[i] = {window, vals[2], limit, spent, held, amount, ok}
end

if replay then
  local out = {2, now, purged, ids}
  for i = 1, n do
    local r = rows[i]
    out[#out + 1] = {r[1], r[2] or '', r[3], r[3] - r[4] - r[5]}
  end
  return out
end

if rejected then
  local out = {0, now, purged, ids}
  for i = 1, n do
    local r = rows[i]
    out[#out + 1] = {r[1], r[3], r[4], r[5], r[7] and 1 or 0}
  end
  return out
end

local out = {1, now, purged, ids}
local expiry = now + lease
for i = 1, n do
  local k = 7 * (i - 1) + 1
  local r = rows[i]
  local epoch = r[2]
  if not epoch then
    epoch = fresh_epoch
  end
  local held = r[5] + r[6]
  redis.call('ZADD', KEYS[k + 1], int(expiry), id .. '|' .. ARGV[4 + 3 * (i - 1) + 3])
  redis.call('PEXPIRE', KEYS[k + 1], int(ttl))
  redis.call('SET', KEYS[k], int(held), 'PX', int(ttl))
  redis.call('SET', KEYS[k + 3], epoch, 'PX', int(ttl))
  out[#out + 1] = {r[1], epoch, r[3], r[3] - r[4] - held}
end
return out
