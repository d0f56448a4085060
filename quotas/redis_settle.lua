-- Sluis quota reconciliation: replace each check's reservation by the actual usage, once.
-- KEYS: the request's admission record, then as for admission.
-- ARGV: request id, then one spec per check, "kind span reserved_cost actual".
-- Returns 1 when it settled, 0 when there was nothing (left) to settle.
--
-- The admission's record says when it was counted (so which window bucket to correct) and that
-- it is not settled yet; the first settle deletes it, so a retried one changes nothing. A settle
-- that finds no record (the admission never ran, or the settle compensates an admission whose
-- answer was lost and that has not arrived yet) leaves the mark 's', for as long as what that
-- admission would hold lives, so the admission, should it still arrive, applies nothing.
local rid = ARGV[1]
local record = KEYS[1]
-- Whole numbers as plain digits: HINCRBY refuses "-0" (a settled 0), and exponents.
local function int(x) return string.format('%.0f', x + 0) end  -- + 0: never "-0"

local admitted = redis.call('GET', record)
if admitted == 's' then return 0 end
if not admitted then
  local keep = 1
  for i = 2, #ARGV do
    local span = tonumber(string.match(ARGV[i], '%a+ (%S+)'))
    keep = math.max(keep, span)
  end
  redis.call('SET', record, 's', 'PX', math.ceil(keep * 1000))
  return 0
end
redis.call('DEL', record)
local admitted_at = tonumber(admitted)

local next_key = 2
for i = 2, #ARGV do
  local kind, span, cost, actual = string.match(ARGV[i], '(%a+) (%S+) (%S+) (%S+)')
  span, cost, actual = tonumber(span), tonumber(cost), tonumber(actual)
  local key = KEYS[next_key]
  next_key = next_key + 1
  if kind == 'window' then
    local index = math.floor(admitted_at / (span / 60))
    if actual ~= cost and redis.call('HEXISTS', key, index) == 1 then
      if redis.call('HINCRBY', key, index, int(actual - cost)) < 0 then
        redis.call('HSET', key, index, 0)
      end
    end
  elseif kind == 'budget' then
    local rkey = KEYS[next_key]
    next_key = next_key + 1
    if redis.call('ZREM', rkey, rid) == 1 then
      local reserved = redis.call('HGET', key, 'c:' .. rid)
      if reserved then  -- else the key was lost, its reservations with it
        redis.call('HINCRBY', key, 'reserved', int(-tonumber(reserved)))
        redis.call('HDEL', key, 'c:' .. rid)
      end
    end
    -- Into a seeded key only: a lost key is not recreated here (without a TTL, counting from
    -- zero); the ledger, which seeds it again at its next admission, has this usage.
    if redis.call('HEXISTS', key, 'seeded') == 1 then
      redis.call('HINCRBY', key, 'used', int(actual))
    end
  else
    redis.call('ZREM', key, rid)
    for slot = 2, cost do redis.call('ZREM', key, rid .. '#' .. slot) end
  end
end
return 1
