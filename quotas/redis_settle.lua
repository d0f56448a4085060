-- Sluis quota reconciliation: replace each check's reservation by the actual usage.
-- KEYS: as for admission. ARGV: now, request id, admitted at, then one spec per check,
-- "kind span reserved_cost actual".
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local admitted_at = tonumber(ARGV[3])
-- Whole numbers as plain digits: HINCRBY refuses "-0" (a settled 0), and exponents.
local function int(x) return string.format('%.0f', x + 0) end  -- + 0: never "-0"
local next_key = 1
for i = 4, #ARGV do
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
      local reserved = tonumber(redis.call('HGET', key, 'c:' .. rid) or '0')
      redis.call('HINCRBY', key, 'reserved', int(-reserved))
      redis.call('HDEL', key, 'c:' .. rid)
    end
    redis.call('HINCRBY', key, 'used', int(actual))
  else
    redis.call('ZREM', key, rid)
    for slot = 2, cost do redis.call('ZREM', key, rid .. '#' .. slot) end
  end
end
return 1
