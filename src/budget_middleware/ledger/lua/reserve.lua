-- reserve: take one hold on every budget, all or nothing.
-- KEYS: one hash per budget (see the prelude).
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
local n = #KEYS
if lease == nil or horizon == nil or n < 1 or #ARGV ~= 4 + 3 * n then
  return redis.error_reply('ERR budget reserve: bad arguments')
end
local periods, defaults, amounts = {}, {}, {}
for i = 1, n do
  local a = 4 + 3 * (i - 1)
  periods[i], defaults[i], amounts[i] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if periods[i] == nil or defaults[i] == nil or amounts[i] == nil or amounts[i] < 0
      or amounts[i] ~= math.floor(amounts[i]) then
    return redis.error_reply('ERR budget reserve: bad arguments')
  end
end

local now = now_ms()
local expiry = now + lease
local hold = 'h:' .. id
local ids = {}
local purged = 0
local rows = {}
local rejected = false
for i = 1, n do
  local key = KEYS[i]
  local window = window_of(now, periods[i])
  local v = redis.call('HMGET', key, 'held', 'epoch', 'limit', 'ttl', 'pa', 's:' .. int(window), hold, 'pc', 'pm')
  local held = tonumber(v[1]) or 0
  local pa = tonumber(v[5]) or 0
  local pm = tonumber(v[9]) -- set while a purge pass is under way: the earliest due time it has seen
  local moved = 0
  local writes = {}
  if not v[4] then
    -- No hash yet (every hash has a `ttl` field): nothing to purge.
    pa = NEVER
  elseif pm or pa <= now then
    local released, cursor
    moved, released, cursor, pm = purge_step(key, v[8] or '0', pm or NEVER, now, horizon, periods[i], ids, writes)
    purged = purged + moved
    held = held - released
    pass_state(cursor, pm, writes, key)
    if cursor == '0' then
      pa, pm = pm, nil
    end
  end
  if held < 0 then
    held = 0
  end
  local limit = tonumber(v[3]) or defaults[i]
  local spent = tonumber(v[6]) or 0
  local ok = (limit - spent - held > 0) and (spent + held + amounts[i] <= limit)
  if not ok then
    rejected = true
  end
  rows[i] = {window, v, limit, spent, held, ok, pa, pm, writes, moved}
end

-- A retried reserve whose first attempt was admitted finds its own hold (and counts it as held).
local replay = rows[1][2][7] ~= false
if rejected or replay then
  -- Nothing is added; only what a purge step changed is written, to budgets that exist.
  local out = {replay and 2 or 0, now, purged, ids}
  for i = 1, n do
    local r = rows[i]
    if #r[9] > 0 and r[2][4] then
      -- Tombstones left by the purge live a horizon from now.
      local expire_at = nil
      if r[10] > 0 then
        expire_at = arm(tonumber(r[2][4]), now, horizon, 0, 0, r[9])
      end
      redis.call('HSET', KEYS[i], unpack(r[9]))
      if expire_at then
        redis.call('PEXPIREAT', KEYS[i], int(expire_at))
      end
    end
    if replay then
      out[#out + 1] = {r[1], r[2][2] or '', r[3], r[3] - r[4] - r[5]}
    else
      out[#out + 1] = {r[1], r[3], r[4], r[5], r[6] and 1 or 0}
    end
  end
  return out
end

local out = {1, now, purged, ids}
for i = 1, n do
  local key = KEYS[i]
  local r = rows[i]
  local window, v, limit, spent, held, pa, pm, writes = r[1], r[2], r[3], r[4], r[5], r[7], r[8], r[9]
  local amount = amounts[i]
  writes[#writes + 1] = hold
  writes[#writes + 1] = int(expiry) .. ':' .. ARGV[4 + 3 * i]
  writes[#writes + 1] = 'held'
  writes[#writes + 1] = int(held + amount)
  local epoch = v[2]
  if not epoch then
    epoch = ARGV[4]
    writes[#writes + 1] = 'epoch'
    writes[#writes + 1] = epoch
  end
  -- The new hold may be the first to expire: the pass in progress, or the next one, must see it.
  -- So must the previous window, when this is the first reserve that sees a new one: it can go
  -- once this one is a period old.
  local due = expiry
  if not v[6] and periods[i] > 0 then
    due = math.min(due, window + periods[i])
  end
  due_by(due, pa, pm, writes)
  local armed = tonumber(v[4]) or 0
  local persist = false
  local expire_at = nil
  if v[3] or (periods[i] == 0 and v[6]) then
    -- A limit override, or the spend of a lifetime budget, is the budget's record: no TTL.
    if armed ~= -1 then
      writes[#writes + 1] = 'ttl'
      writes[#writes + 1] = '-1'
      persist = true
    end
  else
    -- The epoch outlives every write by the horizon, the spend its window: re-armed about once
    -- per horizon, not on every reserve. A hash kept for a reason that has gone is armed again.
    if armed == -1 then
      armed = 0
    end
    expire_at = arm(armed, expiry, horizon, window, periods[i], writes)
  end
  redis.call('HSET', key, unpack(writes))
  if expire_at then
    redis.call('PEXPIREAT', key, int(expire_at))
  elseif persist then
    redis.call('PERSIST', key)
  end
  out[#out + 1] = {window, epoch, limit, limit - spent - held - amount}
end
return out
