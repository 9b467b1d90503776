-- reserve: take one hold on every budget, all or nothing.
-- KEYS: 8 per budget (see the prelude).
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
local n = #KEYS / 8
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
local expiry = now + lease
local ids = {}
local purged = 0
local rows = {}
local rejected = false
for i = 1, n do
  local k = 8 * (i - 1) + 1
  local a = 4 + 3 * (i - 1)
  local period = tonumber(ARGV[a + 1])
  local amount = tonumber(ARGV[a + 3])
  local vals = redis.call('MGET', KEYS[k], KEYS[k + 3], KEYS[k + 4], KEYS[k + 7])
  local purge_at, armed = parse_meta(vals[4])
  local meta_dirty = false
  if purge_at <= now then
    local moved
    moved, purge_at = purge(k, now, horizon, ttl, ids)
    purged = purged + moved
    meta_dirty = true
    if moved > 0 then
      vals[1] = redis.call('GET', KEYS[k])
    end
  end
  local window = 0
  if period > 0 then
    window = now - now % period
  end
  local held = tonumber(vals[1]) or 0
  if held < 0 then
    held = 0
  end
  local limit = tonumber(vals[3]) or tonumber(ARGV[a + 2])
  local spent = tonumber(redis.call('HGET', KEYS[k + 6], int(window))) or 0
  local ok = (limit - spent - held > 0) and (spent + held + amount <= limit)
  if not ok then
    rejected = true
  end
  rows[i] = {window, vals[2], limit, spent, held, amount, ok, purge_at, armed, meta_dirty}
end

local function replay_reply()
  local out = {2, now, purged, ids}
  for i = 1, n do
    local r = rows[i]
    out[#out + 1] = {r[1], r[2] or '', r[3], r[3] - r[4] - r[5]}
  end
  return out
end

local first = id .. '|' .. ARGV[7]
if rejected then
  -- A retried reserve whose first attempt was admitted counts its own hold as held: find it.
  if redis.call('ZSCORE', KEYS[2], first) then
    return replay_reply()
  end
  for i = 1, n do
    local r = rows[i]
    if r[10] then
      write_meta(8 * (i - 1) + 1, r[8], r[9], ttl)
    end
  end
  local out = {0, now, purged, ids}
  for i = 1, n do
    local r = rows[i]
    out[#out + 1] = {r[1], r[3], r[4], r[5], r[7] and 1 or 0}
  end
  return out
end

-- ZADD NX on the first budget both takes its hold and detects a retried reserve.
if redis.call('ZADD', KEYS[2], 'NX', int(expiry), first) == 0 then
  return replay_reply()
end

local out = {1, now, purged, ids}
for i = 1, n do
  local k = 8 * (i - 1) + 1
  local r = rows[i]
  if i > 1 then
    redis.call('ZADD', KEYS[k + 1], int(expiry), id .. '|' .. ARGV[4 + 3 * (i - 1) + 3])
  end
  redis.call('INCRBY', KEYS[k], ARGV[4 + 3 * (i - 1) + 3])
  local epoch = r[2]
  local purge_at, armed, dirty = r[8], r[9], r[10]
  if not epoch then
    epoch = fresh_epoch
    redis.call('SET', KEYS[k + 3], epoch)
    armed = 0
  end
  if armed < now + lease + horizon then
    -- Re-arm the TTLs about once per horizon, not on every reserve.
    local armed_ttl = arm_ttl(lease, horizon)
    arm(k, armed_ttl)
    armed = now + armed_ttl
    dirty = true
  elseif r[5] == 0 then
    -- The holds set may have been empty (and deleted): give the new one its TTL.
    redis.call('PEXPIRE', KEYS[k + 1], int(armed - now))
  end
  if expiry < purge_at then
    purge_at = expiry
    dirty = true
  end
  if dirty then
    write_meta(k, purge_at, armed, armed - now)
  end
  out[#out + 1] = {r[1], epoch, r[3], r[3] - r[4] - r[5] - r[6]}
end
return out
