-- Sluis quota reconciliation: replace each check's reservation by the actual usage.
-- KEYS: as for admission. ARGV: now, request id, admitted at, then one spec per check,
-- "kind span reserved_cost actual".
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local admitted_at = tonumber(ARGV[3])
local next_key = 1
for i = 4, #ARGV do
  local kind, span, cost, actual = string.match(ARGV[i], '(%a+) (%S+) (%S+) (%S+)')
  span, cost, actual = tonumber(span), tonumber(cost), tonumber(actual)
  local key = KEYS[next_key]
  next_key = next_key + 1
  if kind == 'window' then
    local index = math.floor(admitted_at / (span / 60))
    if actual ~= cost and redis.call('HEXISTS', key, index) == 1 then
      if redis.call('HINCRBY', key, index, actual - cost) < 0 then
        redis.call('HSET', key, index, 0)
      end
    end
  elseif kind == 'budget' then
    local rkey = KEYS[next_key]
    next_key = next_key + 1
    if redis.call('ZREM', rkey, rid) == 1 then
      local reserved = tonumber(redis.call('HGET', key, 'c:' .. rid) or '0')
      redis.call('HINCRBY', key, 'reserved', -reserved)
      redis.call('HDEL', key, 'c:' .. rid)
    end
    redis.call('HINCRBY', key, 'used', actual)
  else
    redis.call('ZREM', key, rid)
  end
end
return 1
