-- Shared prelude, prepended to every script when the ledger loads it: the budget's layout and
-- constants. The helper functions are in _helpers.lua, which the loader puts where a script has
-- the line `-- #include _helpers.lua`, or else right after this prelude. Defining a function costs
-- the server a closure on every call of the script, so reserve and settle include them only after
-- their common case has returned.
--
-- A budget is one HASH, passed as one key: <prefix>:{<rule>:<entity>}. Its fields:
--   held        integer micro-units: the sum of live holds
--   epoch       random token of this budget's state (ARCHITECTURE.md 4): '<id>:<s>.<us>', the id of
--               the reservation whose hold made it and the server's TIME then
--   limit       optional per-entity limit override (an operator's setting: the hash then has no TTL)
--   ttl         until when (ms) the hash's TTL is armed; -1 while it has none (a lifetime budget, or
--               a limit override), so scripts know without a PTTL call whether to re-arm it
--   pa          when the next purge pass is due (ms): no earlier than the first hold expiry,
--               tombstone end or window end; a settled hold can leave it early, which costs a pass.
--               0 while a pass is under way, so the next reserve goes on with it
--   pc, pm      a purge pass under way: its HSCAN cursor and the earliest due time it has seen
--               (read only when `pa` is 0, so a reserve's HMGET stays short)
--   s:<window>  integer micro-units spent in the window that starts at <window> (ms)
--   h:<id>      a live hold: "<lease expiry ms>:<amount>"
--   t:<id>      the tombstone of an expired hold: "<when it was purged ms>:<amount>"
--   d:<id>      a settle applied as recovered: when (ms)
-- One key and few fields keep the common paths short: a reserve is TIME, HMGET and HSET, a settle
-- HGET, HDEL and two HINCRBYs. Holds, tombstones and old windows are swept by purge passes that
-- scan the hash a batch at a time, only when `pa` says something may be due.

local PURGE_BATCH = 64
local NEVER = 9007199254740991 -- 2^53 - 1

-- The one helper a script may need before its common case returns (the rest are in _helpers.lua).
-- Makes sure the hash outlives a write at `at` (ms) by the horizon, and the spend of `window` (for a
-- `period` > 0) until that window has ended; when it does not, arms its TTL a horizon further.
-- `armed` is the hash's `ttl` field (-1: persistent, left so). Appends the field to `writes`;
-- returns the time to PEXPIREAT after the caller's HSET, or nil.
local function arm(armed, at, horizon, window, period, writes)
  local need = at + horizon
  if period > 0 and window + period > need then
    need = window + period
  end
  if armed == -1 or armed >= need then
    return nil
  end
  local armed_to = at + 2 * horizon
  if period > 0 and window + period + horizon > armed_to then
    armed_to = window + period + horizon
  end
  writes[#writes + 1] = 'ttl'
  writes[#writes + 1] = string.format('%d', armed_to)
  return armed_to
end
