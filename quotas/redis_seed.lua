-- Sluis budget seeding: start budget keys from the usage ledger's count, once each.
-- KEYS: budget keys (of one tenant, so one Redis Cluster slot).
-- ARGV: now, then per key "used period_end" (used: what the ledger says its scope and period
--       used so far).
-- Returns how many keys it seeded (0 when other gateways seeded them all first).
--
-- Seed if absent: only the first seeder sets a key's 'seeded' field (HSETNX), so gateways that
-- seed at once count the ledger once. It seeds 'used' only, and never lowers it (a key a gateway
-- of the previous version wrote still counts what it counted); reservations in flight are left
-- as they are.
local PERIOD_KEPT_S = 2678400  -- as in redis_admit.lua
local seeded = 0
for i, key in ipairs(KEYS) do
  local used, period_end = string.match(ARGV[i + 1], '(%S+) (%S+)')
  if redis.call('HSETNX', key, 'seeded', ARGV[1]) == 1 then
    if tonumber(used) > tonumber(redis.call('HGET', key, 'used') or '0') then
      redis.call('HSET', key, 'used', used)
    end
    redis.call('PEXPIREAT', key, math.ceil((tonumber(period_end) + PERIOD_KEPT_S) * 1000))
    seeded = seeded + 1
  end
end
return seeded
