-- Sluis quota reconciliation: replace each check's reservation by the actual usage.
-- KEYS: two per check, as for admission. ARGV: now, request id, admitted at, then per check:
-- kind, span, reserved cost, actual.
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local admitted_at = tonumber(ARGV[3])
local n = #KEYS / 2
for i = 1, n do
  local base = 3 + (i - 1) * 4
  local kind, span = ARGV[base + 1], tonumber(ARGV[base + 2])
  local cost, actual = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local key, rkey = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'window' then
    local index = math.floor(admitted_at / (span / 60))
    if actual ~= cost and redis.call('HEXISTS', key, index) == 1 then
      if redis.call('HINCRBY', key, index, actual - cost) < 0 then
        redis.call('HSET', key, index, 0)
      end
    end
  elseif kind == 'budget' then
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
