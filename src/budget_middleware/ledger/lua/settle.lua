-- settle: end one reservation exactly once; remove its holds and add the actual cost to spent.
-- KEYS: one hash per budget (see the prelude).
-- ARGV[1] the hold's field: 'h:' .. reservation id   ARGV[2] actual (micro-units)
-- ARGV[3] tombstone horizon ms
-- then 4 per budget: the amount held, negated; the field of the reserve's window, 's:' .. window
--   ('' when the reserve's reply never came: release only); the epoch the reserve returned; period ms
-- Returns the outcome per budget, separated by spaces: applied | late | recovered | duplicate | stale
--
-- The common path (the hold is there) is HDEL and two HINCRBYs of strings the caller formatted,
-- with one number read: see reserve.lua for why. For one budget it returns before the helpers are
-- defined (see _common.lua).
local hold = ARGV[1]
local n = #KEYS
if n < 1 or #ARGV ~= 3 + 4 * n or string.sub(hold, 1, 2) ~= 'h:' then
  return redis.error_reply('ERR budget settle: bad arguments')
end
-- Every argument is checked before the first write (a script that fails keeps the writes it
-- made). The actual cost and the released amounts go to HINCRBY as they are, so they must be
-- integers as Redis writes them ('5.0', ' 5' and '0x5' are numbers to Lua, not to HINCRBY);
-- the horizon and periods need only be numbers (`s + 0` raises on anything else).
local actual = ARGV[2]
local horizon = ARGV[3] + 0
-- Lengths are bounded too, so no HINCRBY can fail on an out-of-range number after the HDEL.
local bad = not (actual == '0' or #actual <= 16 and string.find(actual, '^[1-9]%d*$'))
  or not (horizon >= 0 and horizon <= NEVER)
actual = actual + 0
for i = 1, n do
  local a = 3 + 4 * (i - 1)
  local release, spent_field, period = ARGV[a + 1], ARGV[a + 2], ARGV[a + 4] + 0
  if not (release == '0' or #release <= 17 and string.find(release, '^%-[1-9]%d*$'))
      or not (spent_field == '' and actual == 0 or string.find(spent_field, '^s:%d+$'))
      or not (period >= 0 and period <= NEVER) then
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

if n == 1 and redis.call('HDEL', KEYS[1], hold) == 1 then
  if ARGV[4] ~= '0' then
    redis.call('HINCRBY', KEYS[1], 'held', ARGV[4])
  end
  add_spent(KEYS[1], ARGV[5], ARGV[7])
  return 'applied'
end

-- #include _helpers.lua

local out = n > 1 and {} or nil
for i = 1, n do
  local key = KEYS[i]
  local a = 3 + 4 * (i - 1)
  local release, spent_field, period = ARGV[a + 1], ARGV[a + 2], ARGV[a + 4]
  local outcome
  if n > 1 and redis.call('HDEL', key, hold) == 1 then -- (one budget's hold was looked for above)
    if release ~= '0' then
      redis.call('HINCRBY', key, 'held', release)
    end
    outcome = 'applied'
  elseif redis.call('HDEL', key, 't:' .. string.sub(hold, 3)) == 1 then
    outcome = 'late'
  elseif spent_field == '' then
    outcome = 'duplicate'
  else
    local now = now_ms()
    -- An id of ours (32 characters) starts with its creation time in ms, in 12 lower-case hex
    -- digits; any other id counts as old (as id_time_ms says in Python).
    local made = #hold == 34 and string.match(hold, '^h:(' .. string.rep('[0-9a-f]', 12) .. ')')
    local old = not made or tonumber(made, 16) < now - horizon
    local done = 'd:' .. string.sub(hold, 3)
    local st = redis.call('HMGET', key, 'epoch', done, 'ttl', 'pa', 'pm')
    if st[1] == ARGV[a + 3] then -- the epoch the reserve returned
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
