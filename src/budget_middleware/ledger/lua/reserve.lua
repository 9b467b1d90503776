-- reserve: take one hold on every budget, all or nothing.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] the hold's field: 'h:' .. reservation id   ARGV[2] lease ms   ARGV[3] tombstone horizon ms
-- then 3 per budget: period ms (0 = lifetime), default limit, amount (micro-units)
-- Returns one flat array: {status, now, k, k expired ids..., then per budget:}
--   status 1 admitted, 2 admitted before (a retried reserve: nothing added): epoch, limit,
--     remaining after
--   status 0 rejected: limit, spent, held, admissible 1|0
-- or, for one budget's common case (below), one string of what was read, as Redis sent it:
--   '<status 1|0> <TIME seconds> <TIME microseconds> <limit override, or -> <held> <spent> <epoch>'
--   (held and spent before this hold; the caller works out now, the limit and what remains; the
--   epoch comes last, as it holds a reservation id, which may be any string).
-- A budget's window is the caller's to work out from `now` and its period.
--
-- This runs on every request, and on Redis most of its cost is the machinery around the logic,
-- so the common path keeps that small: numbers are read by arithmetic (`s + 0`, one conversion,
-- where tonumber() makes two), the HMGET asks only for what every reserve needs, tables are built
-- whole rather than grown, and the reply is one flat array (the server looks up special fields in
-- every table it turns into a reply). The common case's reply is a string made of strings only:
-- a table reply, or a number turned into text, costs more than any other line of it.
--
-- The common case, one budget whose state exists, with no purge pass due and not a retry, is
-- served first, before the helpers are defined (see _common.lua); anything else goes on to the
-- general path below, which reuses the time and the budget's fields read so far.
-- The admission rule (ARCHITECTURE.md section 4; ledger._types.admits is Python's): the budget has
-- room left, and room for the whole amount, so a zero estimate cannot pass an exhausted budget.
local function admits(limit, spent, held, amount)
  return limit - spent - held > 0 and spent + held + amount <= limit
end

local hold = ARGV[1]
local n = #KEYS
if n < 1 or #ARGV ~= 3 + 3 * n or string.sub(hold, 1, 2) ~= 'h:' then
  return redis.error_reply('ERR budget reserve: bad arguments')
end
-- Every argument is checked before the first write (a script that fails keeps the writes it
-- made). `s + 0` raises on a string that is not a number, and a comparison with NaN is false, so
-- `x >= 0 and x <= NEVER` also refuses 'nan' and 'inf'.
local lease, horizon = ARGV[2] + 0, ARGV[3] + 0
local bad = not (lease >= 0 and lease <= NEVER and horizon >= 0 and horizon <= NEVER)
local period, default, amount -- of the last budget checked (the common case has one)
for i = 1, n do
  local a = 3 + 3 * (i - 1)
  period, default, amount = ARGV[a + 1] + 0, ARGV[a + 2] + 0, ARGV[a + 3] + 0
  if not (period >= 0 and period <= NEVER and period % 1 == 0 and default >= -NEVER
      and default <= NEVER and amount >= 0 and amount <= NEVER and amount % 1 == 0) then
    bad = true
  end
end
if bad then
  return redis.error_reply('ERR budget reserve: bad arguments')
end

-- Writes an admitted hold's fields, `writes`, to the budget `key` whose HMGET reply is `v`, and
-- keeps the hash's life right: a limit override, or the spend of a lifetime budget, is the
-- budget's record and has no TTL; otherwise the epoch outlives every write by the horizon and the
-- spend its window, re-armed about once per horizon, not on every reserve (a hash kept for a
-- reason that has gone is armed again).
local function write_hold(key, v, expiry, window, period, writes)
  local armed = v[4] and v[4] + 0 or 0
  if v[3] or (period == 0 and v[6]) then
    if armed == -1 then
      redis.call('HSET', key, unpack(writes))
    else
      writes[#writes + 1] = 'ttl'
      writes[#writes + 1] = '-1'
      redis.call('HSET', key, unpack(writes))
      redis.call('PERSIST', key)
    end
    return
  end
  if armed == -1 then
    armed = 0
  end
  local expire_at = arm(armed, expiry, horizon, window, period, writes)
  redis.call('HSET', key, unpack(writes))
  if expire_at then
    redis.call('PEXPIREAT', key, string.format('%d', expire_at))
  end
end

-- The server's time in ms, and its TIME reply (seconds and microseconds, as strings).
local time = redis.call('TIME')
local us = time[2] + 0
local now = time[1] * 1000 + (us - us % 1000) / 1000
local first = nil -- the first budget's HMGET reply, when the common case did not apply
if n == 1 then
  local key = KEYS[1]
  local window = 0
  if period > 0 then
    window = now - now % period
  end
  local v = redis.call('HMGET', key, 'held', 'epoch', 'limit', 'ttl', 'pa', string.format('s:%d', window), hold)
  local pa = v[5] and v[5] + 0 or NEVER
  if v[2] and not v[7] and pa > now then
    local held = v[1] and v[1] + 0 or 0
    if held < 0 then
      held = 0
    end
    local limit = v[3] and v[3] + 0 or default
    local spent = v[6] and v[6] + 0 or 0
    -- An override is sent as the number read, whatever text an older version stored it as.
    local read = ' ' .. time[1] .. ' ' .. time[2] .. ' ' .. (v[3] and string.format('%d', limit) or '-')
      .. ' ' .. (v[1] or '0') .. ' ' .. (v[6] or '0') .. ' ' .. v[2]
    if not admits(limit, spent, held, amount) then
      return '0' .. read
    end
    local expiry = now + lease
    local writes = {hold, string.format('%d:%d', expiry, amount), 'held', string.format('%d', held + amount)}
    -- As due_by and the general path's admitted writes below.
    local due = expiry
    if not v[6] and period > 0 and window + period < due then
      due = window + period
    end
    if due < pa then
      writes[5] = 'pa'
      writes[6] = string.format('%d', due)
    end
    write_hold(key, v, expiry, window, period, writes)
    return '1' .. read
  end
  first = v
end

-- #include _helpers.lua
local ids = {}
local rows = {}
local rejected = false
for i = 1, n do
  local key = KEYS[i]
  local a = 3 + 3 * (i - 1)
  local period, default, amount = ARGV[a + 1] + 0, ARGV[a + 2] + 0, ARGV[a + 3] + 0
  local window = 0
  if period > 0 then
    window = now - now % period
  end
  local v = first or redis.call('HMGET', key, 'held', 'epoch', 'limit', 'ttl', 'pa', string.format('s:%d', window), hold)
  local held = v[1] and v[1] + 0 or 0
  local pa = v[5] and v[5] + 0 or NEVER -- every hash has `pa` once it has a hold
  local pm = false -- the earliest due time a pass under way has seen
  local writes = false
  local moved = 0
  if pa <= now then
    -- A purge pass is due, or under way (`pa` is 0): one step of it.
    local released
    writes = {}
    moved, released, pa, pm = pass_step(key, pa, now, horizon, period, ids, writes)
    held = held - released
  end
  if held < 0 then
    held = 0
  end
  local limit = v[3] and v[3] + 0 or default
  local spent = v[6] and v[6] + 0 or 0
  local ok = admits(limit, spent, held, amount)
  if not ok then
    rejected = true
  end
  rows[i] = {window, v, limit, spent, held, ok, pa, pm, writes, moved, period, amount}
end

-- A retried reserve whose first attempt was admitted finds its own holds (and counts them as
-- held): on any budget, as another may have lost its state since, and a hold must not be taken twice.
local replay = false
for i = 1, n do
  if rows[i][2][7] then
    replay = true
  end
end
if rejected or replay then
  -- Nothing is added; only what a purge step changed is written, to budgets that exist.
  local out = {replay and 2 or 0, now, #ids}
  for i = 1, #ids do
    out[#out + 1] = ids[i]
  end
  for i = 1, n do
    local r = rows[i]
    if r[9] and #r[9] > 0 and r[2][4] then
      -- Tombstones left by the purge live a horizon from now.
      local expire_at = nil
      if r[10] > 0 then
        expire_at = arm(r[2][4] + 0, now, horizon, 0, 0, r[9])
      end
      redis.call('HSET', KEYS[i], unpack(r[9]))
      if expire_at then
        redis.call('PEXPIREAT', KEYS[i], int(expire_at))
      end
    end
    if replay then
      out[#out + 1] = r[2][2] or ''
      out[#out + 1] = r[3]
      out[#out + 1] = r[3] - r[4] - r[5]
    else
      out[#out + 1] = r[3]
      out[#out + 1] = r[4]
      out[#out + 1] = r[5]
      out[#out + 1] = r[6] and 1 or 0
    end
  end
  return out
end

local expiry = now + lease
local out = nil
for i = 1, n do
  local key = KEYS[i]
  local r = rows[i]
  local window, v, limit, spent, held, pa, pm, writes = r[1], r[2], r[3], r[4], r[5], r[7], r[8], r[9]
  local period, amount = r[11], r[12]
  local value, total = string.format('%d:%d', expiry, amount), int(held + amount)
  if writes then
    writes[#writes + 1] = hold
    writes[#writes + 1] = value
    writes[#writes + 1] = 'held'
    writes[#writes + 1] = total
  else
    writes = {hold, value, 'held', total}
  end
  local epoch = v[2]
  if not epoch then
    -- A new budget state: its epoch is the id of the reservation that made it and the server's
    -- time to the microsecond. The id alone could come again (a reserve retried after Redis lost
    -- the state makes it anew), and so could the millisecond.
    epoch = string.sub(hold, 3) .. ':' .. time[1] .. '.' .. time[2]
    writes[#writes + 1] = 'epoch'
    writes[#writes + 1] = epoch
  end
  -- The new hold may be the first to expire: the pass in progress, or the next one, must see it.
  -- So must the previous window, when this is the first reserve that sees a new one: it can go
  -- once this one is a period old.
  local due = expiry
  if not v[6] and period > 0 and window + period < due then
    due = window + period
  end
  due_by(due, pa, pm, writes)
  write_hold(key, v, expiry, window, period, writes)
  if n == 1 and #ids == 0 then
    return {1, now, 0, epoch, limit, limit - spent - held - amount}
  end
  if not out then
    out = {1, now, #ids}
    for j = 1, #ids do
      out[#out + 1] = ids[j]
    end
  end
  out[#out + 1] = epoch
  out[#out + 1] = limit
  out[#out + 1] = limit - spent - held - amount
end
return out
