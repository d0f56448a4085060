-- Sluis quota split: settle an admission's finished part and hand what still runs to an
-- admission of its own, in one step (an allowance that closed while some of its requests still
-- run: quotas/allowances.py).
-- KEYS: the admission's record, the rest's record, then per check its key, and for a budget
--       also its reservations key, in check order.
-- ARGV: now, request id, rest id, then one spec per check, "kind span cost actual rest".
-- Times in seconds, on Redis's clock. Returns 1 when it split, 0 when there was nothing (left).
--
-- Exactly once, as the settle (redis_settle.lua): the first split or settle deletes the
-- admission's record, so a repeat changes nothing, and one that finds no record leaves the mark
-- 's'. The rest's record carries the admission's time (its settle corrects the same window
-- bucket) and lives at least as long as the admission's would have. The rest is held without a
-- limit check (the room was granted already), but only where the admission's lease was live.
local now = tonumber(ARGV[1])
local rid, rest_id = ARGV[2], ARGV[3]
local record, rest_record = KEYS[1], KEYS[2]
-- Whole numbers as plain digits: HINCRBY refuses "-0" (a settled 0), and exponents.
local function int(x) return string.format('%.0f', x + 0) end  -- + 0: never "-0"

local admitted = redis.call('GET', record)
if admitted == 's' then return 0 end
if not admitted then
  local keep = 1
  for i = 4, #ARGV do
    keep = math.max(keep, tonumber(string.match(ARGV[i], '%a+ (%S+)')))
  end
  redis.call('SET', record, 's', 'PX', math.ceil(keep * 1000))
  return 0
end
local keep_ms = math.max(redis.call('PTTL', record), 1000)
redis.call('DEL', record)
local admitted_at = tonumber(admitted)

local function live(key, member)
  local score = redis.call('ZSCORE', key, member)
  return score and tonumber(score) > now
end

local next_key = 3
for i = 4, #ARGV do
  local kind, span, cost, actual, rest = string.match(ARGV[i], '(%a+) (%S+) (%S+) (%S+) (%S+)')
  span, cost, actual, rest = tonumber(span), tonumber(cost), tonumber(actual), tonumber(rest)
  local key = KEYS[next_key]
  next_key = next_key + 1
  if kind == 'window' then
    -- The rest stays counted in the admission's bucket.
    local index = math.floor(admitted_at / (span / 60))
    local delta = actual + rest - cost
    if delta ~= 0 and redis.call('HEXISTS', key, index) == 1 then
      if redis.call('HINCRBY', key, index, int(delta)) < 0 then
        redis.call('HSET', key, index, 0)
      end
    end
  elseif kind == 'budget' then
    local rkey = KEYS[next_key]
    next_key = next_key + 1
    local held = live(rkey, rid)
    if redis.call('ZREM', rkey, rid) == 1 then
      local reserved = redis.call('HGET', key, 'c:' .. rid)
      if reserved then  -- else the key was lost, its reservations with it
        redis.call('HINCRBY', key, 'reserved', int(-tonumber(reserved)))
        redis.call('HDEL', key, 'c:' .. rid)
      end
    end
    -- As the settle: a lost key is not recreated here (the ledger seeds it again).
    local seeded = redis.call('HEXISTS', key, 'seeded') == 1
    if seeded then redis.call('HINCRBY', key, 'used', int(actual)) end
    if held and seeded and rest > 0 then
      redis.call('HINCRBY', key, 'reserved', int(rest))
      redis.call('HSET', key, 'c:' .. rest_id, int(rest))
      redis.call('ZADD', rkey, now + span, rest_id)
      -- The ZREM above may have emptied (deleted) the reservations key: its expiry follows
      -- the budget's again, as the admission set it.
      local ttl = redis.call('PTTL', key)
      if ttl > 0 then redis.call('PEXPIRE', rkey, ttl) end
    end
  else
    local held = live(key, rid)
    redis.call('ZREM', key, rid)
    for slot = 2, cost do redis.call('ZREM', key, rid .. '#' .. slot) end
    if held and rest > 0 then
      redis.call('ZADD', key, now + span, rest_id)
      for slot = 2, rest do redis.call('ZADD', key, now + span, rest_id .. '#' .. slot) end
      local ms = math.ceil(span * 1000)
      if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
      keep_ms = math.max(keep_ms, ms)
    end
  end
end
redis.call('SET', rest_record, admitted, 'PX', keep_ms)
return 1
