-- Helpers shared by the scripts (see _common.lua for where they are included).

-- Integers cross into commands as exact decimal strings, never as Lua's %.14g floats.
local function int(x)
  return string.format('%d', x)
end

-- The server's time in ms, then its TIME reply (seconds and microseconds, as strings).
local function now_ms()
  local t = redis.call('TIME')
  local us = t[2] + 0
  return t[1] * 1000 + (us - us % 1000) / 1000, t
end

local function window_of(now, period)
  if period > 0 then
    return now - now % period
  end
  return 0
end

-- One step of a purge pass over the hash at `key`, from HSCAN `cursor`: expired holds become
-- tombstones (their purge time and amount) (their ids appended to `ids`, their field/value pairs to `writes` for the caller's
-- HSET), tombstones and done records older than the horizon and windows that ended a period ago are
-- deleted. `due` carries the earliest time anything seen will be due.
-- Returns moved, released amount, next cursor ('0': the pass is complete), due.
local function purge_step(key, cursor, due, now, horizon, period, ids, writes)
  local scan = redis.call('HSCAN', key, cursor, 'COUNT', PURGE_BATCH)
  local kv = scan[2]
  local dels = {}
  local moved, released = 0, 0
  for i = 1, #kv, 2 do
    local field, value = kv[i], kv[i + 1]
    local kind = string.sub(field, 1, 2)
    if kind == 'h:' then
      local sep = string.find(value, ':', 1, true)
      local expiry = tonumber(string.sub(value, 1, sep - 1))
      if expiry <= now then
        local id = string.sub(field, 3)
        local amount = string.sub(value, sep + 1)
        released = released + tonumber(amount)
        moved = moved + 1
        ids[#ids + 1] = id
        dels[#dels + 1] = field
        writes[#writes + 1] = 't:' .. id
        writes[#writes + 1] = int(now) .. ':' .. amount
        due = math.min(due, now + horizon)
      else
        due = math.min(due, expiry)
      end
    elseif kind == 't:' or kind == 'd:' then
      -- '<time>', or a tombstone's '<time>:<amount>' (a tombstone of an older version: '<time>')
      local sep = string.find(value, ':', 1, true)
      local ends = tonumber(sep and string.sub(value, 1, sep - 1) or value) + horizon
      if ends <= now then
        dels[#dels + 1] = field
      else
        due = math.min(due, ends)
      end
    elseif kind == 's:' and period > 0 then
      local ends = tonumber(string.sub(field, 3)) + 2 * period
      if ends <= now then
        dels[#dels + 1] = field
      else
        due = math.min(due, ends)
      end
    end
  end
  if #dels > 0 then
    redis.call('HDEL', key, unpack(dels))
  end
  if released > 0 then
    redis.call('HINCRBY', key, 'held', int(-released))
  end
  return moved, released, scan[1], due
end

-- The pass-state fields for the caller's HSET after a purge step (and the fields to delete when the
-- pass is complete): the pass goes on from `cursor` at the next call, or is done and `due` is when
-- the next one is.
local function pass_state(cursor, due, writes, key)
  if cursor == '0' then
    writes[#writes + 1] = 'pa'
    writes[#writes + 1] = int(due)
    redis.call('HDEL', key, 'pc', 'pm')
  else
    writes[#writes + 1] = 'pa'
    writes[#writes + 1] = '0'
    writes[#writes + 1] = 'pc'
    writes[#writes + 1] = cursor
    writes[#writes + 1] = 'pm'
    writes[#writes + 1] = int(due)
  end
end

-- One step of the purge pass of the hash at `key`, whose `pa` field is `pa` (at most `now`: a pass
-- is due, or under way when 0). Expired ids go to `ids`, the writes (tombstones, the pass state) to
-- `writes` for the caller's HSET. Returns moved, released amount, and the new `pa` and `pm`: `pa`
-- 0 and `pm` the earliest due time seen while the pass goes on, or `pa` the next pass's due time
-- and `pm` false once it is complete.
local function pass_step(key, pa, now, horizon, period, ids, writes)
  local cursor, pm = '0', NEVER
  if pa == 0 then
    local pass = redis.call('HMGET', key, 'pc', 'pm')
    cursor, pm = pass[1] or '0', tonumber(pass[2]) or NEVER
  end
  local moved, released
  moved, released, cursor, pm = purge_step(key, cursor, pm, now, horizon, period, ids, writes)
  pass_state(cursor, pm, writes, key)
  if cursor == '0' then
    return moved, released, pm, false
  end
  return moved, released, 0, pm
end

-- Makes the purge pass under way (`pm` set) or the next one (`pa`) come no later than `due`.
-- Appends the field to `writes` when it moves.
local function due_by(due, pa, pm, writes)
  if pm then
    if due < pm then
      writes[#writes + 1] = 'pm'
      writes[#writes + 1] = int(due)
    end
  elseif due < (pa or NEVER) then
    writes[#writes + 1] = 'pa'
    writes[#writes + 1] = int(due)
  end
end
