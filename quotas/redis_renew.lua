-- Sluis quota lease renewal: the gateway still runs these admissions, so their budget
-- reservations and concurrency slots live on to now + span (never shortened), and their records
-- at least as long, so their settle still finds them. An admission settled, never made, given up
-- (the mark 's'), or whose lease has lapsed already (its score is past) is left as it is.
-- KEYS: per check its key, and for a budget also its reservations key, in check order; then one
--       admission record per request id, in request order.
-- ARGV: now, the number of checks, one spec per check ("kind span cost": a concurrency check's
--       cost is the slots each admission holds), then the request ids.
-- Times in seconds, on Redis's clock. Returns the number of leases renewed.
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])

local specs, next_key, longest = {}, 1, 0
for i = 1, n do
  local kind, span, cost = string.match(ARGV[2 + i], '(%a+) (%S+) (%S+)')
  local spec = {kind = kind, span = tonumber(span), cost = tonumber(cost), key = KEYS[next_key]}
  next_key = next_key + 1
  if kind == 'budget' then
    spec.rkey = KEYS[next_key]
    next_key = next_key + 1
  end
  if kind ~= 'window' then longest = math.max(longest, spec.span) end
  specs[i] = spec
end

-- Extend one lease (a sorted-set member scored by its expiry) if it is still live.
local function extend(key, member, expiry)
  local score = redis.call('ZSCORE', key, member)
  if score and tonumber(score) > now and tonumber(score) < expiry then
    redis.call('ZADD', key, expiry, member)
    return 1
  end
  return 0
end

-- A key lives at least `ms` more (a lease in it must not outlive it).
local function keep(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl ~= -2 and ttl < ms then redis.call('PEXPIRE', key, ms) end
end

local renewed = 0
for r = 3 + n, #ARGV do
  local rid = ARGV[r]
  local record = KEYS[next_key + r - 3 - n]
  local admitted = redis.call('GET', record)
  if admitted and admitted ~= 's' then
    for _, spec in ipairs(specs) do
      local expiry = now + spec.span
      if spec.kind == 'budget' then
        renewed = renewed + extend(spec.rkey, rid, expiry)
      elseif spec.kind == 'concurrency' then
        local slots = extend(spec.key, rid, expiry)
        for slot = 2, spec.cost do slots = slots + extend(spec.key, rid .. '#' .. slot, expiry) end
        if slots > 0 then keep(spec.key, math.ceil(spec.span * 1000)) end
        renewed = renewed + slots
      end
    end
    keep(record, math.ceil(longest * 1000))
  end
end
return renewed
