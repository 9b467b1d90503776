-- Shared prelude, prepended to every script when the ledger loads it.
--
-- Every budget passes 8 keys, in this order, starting at KEYS[k]:
--   k+0 held     integer micro-units: the sum of live holds
--   k+1 holds    ZSET "<reservation id>|<amount>" -> lease expiry (ms)
--   k+2 expired  ZSET "<reservation id>|<amount>" -> purge time (ms): tombstones of expired holds
--   k+3 epoch    random token of this budget's state
--   k+4 limit    optional per-entity limit override (no TTL: an operator's setting)
--   k+5 done     ZSET reservation id -> time: settles applied as recovered
--   k+6 spent    HASH window start (ms) -> integer micro-units
--   k+7 meta     "<purge at>:<armed until>": when the earliest hold may expire (so reserves skip
--                the purge scan until then), and until when the state keys' TTLs are armed (so
--                reserves skip re-arming them until half a horizon is left)
-- A hold's member carries its amount, so no per-hold hash is needed and a tombstone is one entry.

local PURGE_BATCH = 64
local NEVER = 9007199254740991 -- 2^53 - 1

-- Integers cross into commands as exact decimal strings, never as Lua's %.14g floats.
local function int(x)
  return string.format('%d', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function member_amount(member)
  local sep = string.find(member, '|', 1, true)
  return string.sub(member, 1, sep - 1), tonumber(string.sub(member, sep + 1))
end

local function parse_meta(value)
  if not value then
    return 0, 0
  end
  local sep = string.find(value, ':', 1, true)
  return tonumber(string.sub(value, 1, sep - 1)), tonumber(string.sub(value, sep + 1))
end

local function write_meta(k, purge_at, armed, ttl)
  redis.call('SET', KEYS[k + 7], int(purge_at) .. ':' .. int(armed), 'PX', int(ttl))
end

-- How long hold state lives after it is armed: a lease and two horizons, re-armed when less than
-- a lease and one horizon is left, so the epoch outlives every write by at least the horizon.
local function arm_ttl(lease, horizon)
  return lease + 2 * horizon
end

-- Gives the hold state of the budget at KEYS[k] a TTL of `ttl` from now.
local function arm(k, ttl)
  redis.call('PEXPIRE', KEYS[k], int(ttl))
  redis.call('PEXPIRE', KEYS[k + 1], int(ttl))
  redis.call('PEXPIRE', KEYS[k + 3], int(ttl))
end

-- Moves at most PURGE_BATCH expired holds of the budget at KEYS[k] to its tombstones, appends
-- their ids to `ids`. Returns how many it moved and the new purge hint (the earliest expiry left).
-- Bounded work: the rest go on later calls (the hint then stays due).
local function purge(k, now, horizon, ttl, ids)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[k + 1], '-inf', int(now), 'LIMIT', 0, PURGE_BATCH)
  local n = #expired
  if n > 0 then
    local total = 0
    local scored = {}
    for i, member in ipairs(expired) do
      local id, amount = member_amount(member)
      total = total + amount
      ids[#ids + 1] = id
      scored[2 * i - 1] = int(now)
      scored[2 * i] = member
    end
    redis.call('ZREM', KEYS[k + 1], unpack(expired))
    redis.call('ZADD', KEYS[k + 2], unpack(scored))
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', int(now - horizon))
    redis.call('PEXPIRE', KEYS[k + 2], int(ttl))
    redis.call('DECRBY', KEYS[k], int(total))
  end
  local first = redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')
  local next_at = NEVER
  if first[2] then
    next_at = tonumber(first[2])
  end
  return n, next_at
end

-- Adds `actual` to the spend of `window`. When that creates the window's field, it drops windows
-- that ended two periods ago and re-arms the hash's TTL (a lifetime budget's spend never expires).
local function add_spent(k, window, actual, period)
  local v = redis.call('HINCRBY', KEYS[k + 6], int(window), int(actual))
  if v ~= actual or period == 0 then
    return
  end
  local now = now_ms()
  local newest = window
  for _, field in ipairs(redis.call('HKEYS', KEYS[k + 6])) do
    local w = tonumber(field)
    if w ~= window and w + 2 * period < now then
      redis.call('HDEL', KEYS[k + 6], field)
    elseif w > newest then
      newest = w
    end
  end
  local ttl = newest + 2 * period - now
  if ttl < 1000 then
    ttl = 1000
  end
  redis.call('PEXPIRE', KEYS[k + 6], int(ttl))
end
