-- Sluis quota admission: evaluate every check, then apply all of them or none (one round trip).
-- KEYS: the request's admission record, then per check its key, and for a budget also its
--       reservations key, in check order.
-- ARGV: now, request id, mode ("admit" | "state"), then one spec per check,
--       "kind limit cost span period_end" (few arguments: packing them is the client's cost).
-- Times in seconds, on Redis's clock (the client corrects its own by the offset it measured).
-- Returns {allowed, failed index, retry after ms, never, then per check: used, reserved, reset ms},
-- or {-1, indexes} when budget keys must be seeded first (below).
--
-- An admission is applied once per request id: it leaves a record (its time, read back by the
-- settle, which deletes it), and a record already there means "applied already" (answered
-- allowed, nothing applied again) or, when it is the mark 's' a compensating settle left,
-- "given up by its gateway" (answered refused, nothing applied).
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local mode = ARGV[3]
local record = KEYS[1]
local BUCKETS = 60
local PERIOD_KEPT_S = 2678400  -- budget keys stay a month after their period, for inspection

-- Whole numbers as plain digits: HINCRBY refuses "-0" (a settled 0), and exponents.
local function int(x) return string.format('%.0f', x + 0) end  -- + 0: never "-0"

local specs = {}
local next_key = 2
for i = 4, #ARGV do
  local kind, limit, cost, span, period_end = string.match(ARGV[i], '(%a+) (%S+) (%S+) (%S+) (%S+)')
  local spec = {kind = kind, limit = tonumber(limit), cost = tonumber(cost), span = tonumber(span),
                period_end = tonumber(period_end), key = KEYS[next_key]}
  next_key = next_key + 1
  if kind == 'budget' then
    spec.rkey = KEYS[next_key]
    next_key = next_key + 1
  end
  specs[#specs + 1] = spec
end
local n = #specs

-- A budget key without its 'seeded' field is new (a new period) or was lost (Redis restarted
-- empty, a flush, an eviction): answer {-1, the index of each such check} and change nothing.
-- The gateway seeds them from the usage ledger (redis_seed.lua) and asks again.
local unseeded = {-1}
for i = 1, n do
  if specs[i].kind == 'budget' and redis.call('HEXISTS', specs[i].key, 'seeded') == 0 then
    unseeded[#unseeded + 1] = i
  end
end
if #unseeded > 1 then return unseeded end

local prior = false
if mode == 'admit' then
  prior = redis.call('GET', record)
  if prior then mode = 'state' end
end

local function window(key, limit, cost, span)
  local width = span / BUCKETS
  local oldest = math.floor(now / width) - BUCKETS
  local flat = redis.call('HGETALL', key)
  local used, buckets = 0, {}
  for i = 1, #flat, 2 do
    local index, value = tonumber(flat[i]), tonumber(flat[i + 1])
    if index < oldest then
      redis.call('HDEL', key, flat[i])
    else
      used = used + value
      buckets[#buckets + 1] = {index, value}
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local reset, retry = 0, span
  if #buckets > 0 then reset = (buckets[1][1] + BUCKETS + 1) * width - now end
  local excess, freed = used + cost - limit, 0
  for _, bucket in ipairs(buckets) do
    freed = freed + bucket[2]
    if freed >= excess then
      retry = math.max(0, (bucket[1] + BUCKETS + 1) * width - now)
      break
    end
  end
  return used, 0, reset, retry
end

local function budget(key, rkey, period_end)
  local expired = redis.call('ZRANGEBYSCORE', rkey, '-inf', now)
  for _, request in ipairs(expired) do
    local cost = tonumber(redis.call('HGET', key, 'c:' .. request) or '0')
    redis.call('HINCRBY', key, 'reserved', int(-cost))
    redis.call('HDEL', key, 'c:' .. request)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', rkey, '-inf', now) end
  local used = tonumber(redis.call('HGET', key, 'used') or '0')
  local reserved = tonumber(redis.call('HGET', key, 'reserved') or '0')
  local reset = math.max(0, period_end - now)
  return used, reserved, reset, reset
end

local function concurrency(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key), 0, 0, 1
end

local states = {}
for i = 1, n do
  local spec = specs[i]
  local kind, limit, cost, span, period_end = spec.kind, spec.limit, spec.cost, spec.span, spec.period_end
  local key, rkey = spec.key, spec.rkey
  local used, reserved, reset, retry
  if kind == 'window' then
    used, reserved, reset, retry = window(key, limit, cost, span)
  elseif kind == 'budget' then
    used, reserved, reset, retry = budget(key, rkey, period_end)
  else
    used, reserved, reset, retry = concurrency(key)
  end
  if mode == 'admit' and used + reserved + cost > limit then
    local never = 0
    if cost > limit then never = 1 end
    return {0, i, math.ceil(retry * 1000), never, used, reserved, math.ceil(reset * 1000)}
  end
  states[#states + 1] = {used, reserved, math.ceil(reset * 1000)}
end

if prior == 's' then
  return {0, 1, 0, 0, states[1][1], states[1][2], states[1][3]}
end

local result = {1, 0, 0, 0}
local keep_ms = 1000  -- how long the record must live: as long as what it guards
for i = 1, n do
  local spec = specs[i]
  local kind, cost, span, period_end = spec.kind, spec.cost, spec.span, spec.period_end
  local key, rkey = spec.key, spec.rkey
  local used, reserved = states[i][1], states[i][2]
  if mode == 'admit' then
    if kind == 'window' then
      local width = span / BUCKETS
      redis.call('HINCRBY', key, math.floor(now / width), int(cost))
      local ttl = math.ceil((span + 2 * width) * 1000)
      redis.call('PEXPIRE', key, ttl)
      keep_ms = math.max(keep_ms, ttl)
      used = used + cost
    elseif kind == 'budget' then
      redis.call('HINCRBY', key, 'reserved', int(cost))
      redis.call('HSET', key, 'c:' .. rid, int(cost))
      redis.call('ZADD', rkey, now + span, rid)
      local expire_at = math.ceil((period_end + PERIOD_KEPT_S) * 1000)
      redis.call('PEXPIREAT', key, expire_at)
      redis.call('PEXPIREAT', rkey, expire_at)
      -- A settle after the lease still counts the usage: the record lives as long as the key.
      keep_ms = math.max(keep_ms, expire_at - math.floor(now * 1000))
      reserved = reserved + cost
    else
      -- One member per slot: the request id, then id#2, id#3, ... (an allowance holds several).
      redis.call('ZADD', key, now + span, rid)
      for slot = 2, cost do redis.call('ZADD', key, now + span, rid .. '#' .. slot) end
      redis.call('PEXPIRE', key, math.ceil(span * 1000))
      keep_ms = math.max(keep_ms, math.ceil(span * 1000))
      used = used + cost
    end
  end
  result[#result + 1] = used
  result[#result + 1] = reserved
  result[#result + 1] = states[i][3]
end
if mode == 'admit' then
  redis.call('SET', record, string.format('%.17g', now), 'PX', keep_ms)
end
return result
