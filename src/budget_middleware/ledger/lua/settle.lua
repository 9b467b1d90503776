-- settle: end one reservation exactly once; remove its holds and add the actual cost to spent.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] the hold's field: 'h:' .. reservation id   ARGV[2] actual (micro-units)
-- ARGV[3] tombstone horizon ms
-- then 4 per budget: the field of the reserve's window, 's:' .. window ('' when the reserve's reply
--   never came: release only); the epoch the reserve returned; period ms; the server's time (ms)
--   of the reserve, as its reply gave it (0 when unknown: the id's creation time stands in)
-- The amount released is the one stored with the hold: the caller sends none.
-- Returns the outcome per budget, separated by spaces: applied | late | recovered | duplicate | stale
--
-- The common path (the hold is there) is HGET, HDEL and two HINCRBYs of strings the caller
-- formatted or the hash stored, with one number read: see reserve.lua for why. For one budget it
-- returns before the helpers are defined (see _common.lua).
local hold = ARGV[1]
local n = #KEYS
if n < 1 or #ARGV ~= 3 + 4 * n or string.sub(hold, 1, 2) ~= 'h:' then
  return redis.error_reply('ERR budget settle: bad arguments')
end
-- Every argument is checked before the first write (a script that fails keeps the writes it
-- made). The actual cost goes to HINCRBY as it is, so it must be an integer as Redis writes them
-- ('5.0', ' 5' and '0x5' are numbers to Lua, not to HINCRBY); the horizon, periods and reserve
-- times need only be numbers (`s + 0` raises on anything else).
local actual = ARGV[2]
local horizon = ARGV[3] + 0
-- Its length is bounded too, so no HINCRBY can fail on an out-of-range number after the HDEL.
local bad = not (actual == '0' or #actual <= 16 and string.find(actual, '^[1-9]%d*$'))
  or not (horizon >= 0 and horizon <= NEVER)
actual = actual + 0
for i = 1, n do
  local a = 3 + 4 * (i - 1)
  local spent_field, period, reserved = ARGV[a + 1], ARGV[a + 3] + 0, ARGV[a + 4] + 0
  if not (spent_field == '' and actual == 0 or string.find(spent_field, '^s:%d+$'))
      or not (period >= 0 and period <= NEVER and reserved >= 0 and reserved <= NEVER) then
    bad = true
  end
end
if bad then
  return redis.error_reply('ERR budget settle: bad arguments')
end

-- Adds the actual cost to the budget `key`'s spend in its window, unless there is none to add
-- (or the reserve's reply never came: a release).
local function add_spent(key, spent_field, period)
  if actual > 0 and spent_field ~= '' then
    if redis.call('HINCRBY', key, spent_field, ARGV[2]) == actual and period == '0' then
      -- The first spend of a lifetime budget: from now on the hash is its record, with no TTL.
      redis.call('HSET', key, 'ttl', '-1')
      redis.call('PERSIST', key)
    end
  end
end

if n == 1 then
  local v = redis.call('HGET', KEYS[1], hold)
  if v then
    -- '<lease expiry>:<amount>': the amount is cut out before the first write.
    local amount = string.sub(v, string.find(v, ':', 1, true) + 1)
    redis.call('HDEL', KEYS[1], hold)
    if amount ~= '0' then
      redis.call('HINCRBY', KEYS[1], 'held', '-' .. amount)
    end
    add_spent(KEYS[1], ARGV[4], ARGV[6])
    return 'applied'
  end
end

-- #include _helpers.lua

-- The amount of every budget's hold, '<lease expiry>:<amount>' (false where there is none), read
-- before any is released: a value that is not a hold's stops the script before it writes. (One
-- budget's hold was looked for above.)
local amounts = {}
for i = 1, n do
  local v = n > 1 and redis.call('HGET', KEYS[i], hold)
  amounts[i] = v and string.sub(v, string.find(v, ':', 1, true) + 1)
end
local out = n > 1 and {} or nil
for i = 1, n do
  local key = KEYS[i]
  local a = 3 + 4 * (i - 1)
  local spent_field, period = ARGV[a + 1], ARGV[a + 3]
  local outcome
  if amounts[i] then
    redis.call('HDEL', key, hold)
    if amounts[i] ~= '0' then
      redis.call('HINCRBY', key, 'held', '-' .. amounts[i])
    end
    outcome = 'applied'
  elseif redis.call('HDEL', key, 't:' .. string.sub(hold, 3)) == 1 then
    outcome = 'late'
  elseif spent_field == '' then
    outcome = 'duplicate'
  else
    local now = now_ms()
    -- Stale: the reserve is older than the horizon, on the server's clock. The time of an older
    -- settlement's reserve is unknown: then that of the id stands in, made by a replica's clock.
    -- An id of ours (32 characters) starts with it in ms, in 12 lower-case hex digits; any other
    -- id counts as old (as id_time_ms says in Python).
    local reserved = ARGV[a + 4] + 0
    if reserved == 0 then
      local made = #hold == 34 and string.match(hold, '^h:(' .. string.rep('[0-9a-f]', 12) .. ')')
      reserved = made and tonumber(made, 16) or 0
    end
    local old = reserved < now - horizon
    local done = 'd:' .. string.sub(hold, 3)
    local st = redis.call('HMGET', key, 'epoch', done, 'ttl', 'pa', 'pm')
    if st[1] == ARGV[a + 2] then -- the epoch the reserve returned
      if old then outcome = 'stale' else outcome = 'duplicate' end
    elseif st[2] then
      outcome = 'duplicate'
    elseif old then
      outcome = 'stale'
    else
      -- The state this settle would have found is gone (a restart without persistence, a
      -- failover that lost writes): the spend happened, so apply it, and remember the id for
      -- its own retries.
      outcome = 'recovered'
      local writes = {done, int(now)}
      -- The done record is swept after the horizon: the next purge pass must come by then.
      due_by(now + horizon, tonumber(st[4]), tonumber(st[5]), writes)
      local window = string.sub(spent_field, 3) + 0
      local expire_at = arm(tonumber(st[3]) or 0, now, horizon, window, period + 0, writes)
      redis.call('HSET', key, unpack(writes))
      if expire_at then
        redis.call('PEXPIREAT', key, int(expire_at))
      end
    end
  end
  if outcome ~= 'duplicate' and outcome ~= 'stale' then
    add_spent(key, spent_field, period)
  end
  if n == 1 then
    return outcome
  end
  out[i] = outcome
end
return table.concat(out, ' ')
