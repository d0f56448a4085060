"""Budgets survive restarts and store loss (review M7): the in-process store and a Redis that lost
a tenant's keys seed each budget from the usage ledger (its day or month, its scope), and every
key the Redis scripts write keeps a TTL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from gateway.clock import ManualClock
from gateway.settings import FileConfig
from quotas.checks import Check, Kind
from quotas.memory import MemoryStore
from quotas.redis import RedisStore
from quotas.resp import RespConnection
from quotas.store import QuotaStore, StoreFailure
from tests.conftest import GatewayFactory, RunningGateway
from tests.gateway.errors import assert_openai_error
from tests.quotas.conftest import REDIS_URL
from tests.quotas.test_gateway_quotas import MODELS, PRICES, chat, set_quotas
from tests.quotas.test_store_contract import T0, concurrency, window

FILE = FileConfig(models=MODELS, prices=PRICES)
# A chat of 2 prompt words and max_tokens 4: 6 tokens, 0.01 EUR. Nine spend 90 % of these.
LIMITS = {"tokens_per_day": 60, "eur_per_month": 0.1}


def _tomorrow_noon() -> datetime:
    """A fixed instant ahead of the real clock (Redis keys expire after their period)."""
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def _tenant_id(gateway: RunningGateway, name: str) -> str:
    tenant_id: str = gateway.admin("GET", f"/tenants/{name}").json()["id"]
    return tenant_id


def _limits(gateway: RunningGateway, name: str) -> dict[str, dict[str, Any]]:
    """The tenant's limits by scope and key kind ("all:tpd", "fake-chat:eur", ...)."""
    gateway.server.call(gateway.state.quotas.drain())
    response = gateway.admin("GET", f"/tenants/{name}/quota")
    assert response.status_code == 200, response.text
    return {
        f"{row['scope']}:{row['key'].split(':')[-2]}": row
        for row in response.json()["limits"]
        if row["kind"] == "budget"
    }


def _tenant_keys(client: redis.Redis, tenant_id: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"sluis:q:{{{tenant_id}}}*"))


def _is_budget_hash(key: str) -> bool:
    return any(f":{kind}:" in key for kind in ("tpd", "tpmo", "eur")) and not key.endswith(":r")


def _assert_every_key_has_a_ttl(client: redis.Redis, tenant_id: str) -> int:
    keys = _tenant_keys(client, tenant_id)
    assert {key: client.pttl(key) for key in keys if client.pttl(key) <= 0} == {}
    return len(keys)


def _spend_nine_tenths(gateway: RunningGateway, key: str, requests: int = 9) -> None:
    for _ in range(requests):
        assert chat(gateway, key).status_code == 200


def _assert_the_rest_is_exact(gateway: RunningGateway, key: str) -> None:
    """54 of 60 tokens and 0.09 of 0.10 EUR used: only a request within both fits."""
    # 2 + 5 tokens: one token too many.
    assert_openai_error(chat(gateway, key, max_tokens=5), 429, "budget_tokens")
    # 1 + 5 tokens fit; 0.001 + 0.010 EUR do not.
    assert_openai_error(chat(gateway, key, words=1, max_tokens=5), 429, "budget_money")
    # Exactly what is left: the ledger was counted once, not twice.
    assert chat(gateway, key).status_code == 200
    assert_openai_error(chat(gateway, key, words=1, max_tokens=1), 429, "budget_tokens")
    limits = _limits(gateway, "acme")
    assert (limits["all:tpd"]["used"], limits["all:tpd"]["reserved"]) == (60, 0)
    assert (limits["all:eur"]["used"], limits["all:eur"]["reserved"]) == (100_000, 0)


def test_in_process_budgets_survive_a_restart(gateway_factory: GatewayFactory) -> None:
    clock = ManualClock(_tomorrow_noon())
    first = gateway_factory(clock=clock, file=FILE)
    key = first.create_tenant("acme")
    set_quotas(first, "acme", LIMITS)
    _spend_nine_tenths(first, key)
    first.stop()

    again = gateway_factory(clock=clock, file=FILE)  # same database, a new in-process store
    limits = _limits(again, "acme")
    assert (limits["all:tpd"]["used"], limits["all:eur"]["used"]) == (54, 90_000)
    _assert_the_rest_is_exact(again, key)


@pytest.mark.parametrize("lost", ["every key", "budget keys"])
def test_budgets_lost_in_redis_are_seeded_again_from_the_ledger(
    gateway_factory: GatewayFactory, lost: str
) -> None:
    gateway = gateway_factory(clock=ManualClock(_tomorrow_noon()), redis_url=REDIS_URL, file=FILE)
    key = gateway.create_tenant("acme")
    tenant_id = _tenant_id(gateway, "acme")
    set_quotas(gateway, "acme", LIMITS)
    _spend_nine_tenths(gateway, key, requests=8)
    body = {
        "model": "fake-chat",
        "max_tokens": 4,
        "stream": True,
        "messages": [{"role": "user", "content": "w [[delay:0.1]]"}],
    }
    with (
        redis.Redis.from_url(REDIS_URL) as client,
        httpx.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=30,
        ) as in_flight,
    ):
        assert in_flight.status_code == 200  # admitted: its reservation is in Redis
        # Redis loses the tenant's keys while the ninth request streams (a restart without
        # persistence, FLUSHALL, an eviction), then that request settles.
        keys = _tenant_keys(client, tenant_id)
        client.delete(*[k for k in keys if lost == "every key" or _is_budget_hash(k)])
        in_flight.read()
        gateway.server.call(gateway.state.quotas.drain())
        _assert_every_key_has_a_ttl(client, tenant_id)  # the settle recreated no key bare

        _assert_the_rest_is_exact(gateway, key)
        assert _assert_every_key_has_a_ttl(client, tenant_id) >= 2  # the budgets, seeded
        spent = [r for r in gateway.records() if r["status"] == 200]
        assert sum(r["total_tokens"] for r in spent) == 60
        assert sum(r["cost_micro_eur"] for r in spent) == 100_000


def _first_of_next_month() -> datetime:
    now = datetime.now(UTC)
    return datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_each_budget_is_seeded_from_its_own_period_and_scope(
    gateway_factory: GatewayFactory, store: str
) -> None:
    month = _first_of_next_month()
    clock = ManualClock(month - timedelta(hours=12))  # the last day of the month before
    redis_url = REDIS_URL if store == "redis" else None
    first = gateway_factory(clock=clock, redis_url=redis_url, file=FILE)
    key = first.create_tenant("acme")
    tenant_id = _tenant_id(first, "acme")
    set_quotas(
        first,
        "acme",
        {
            "tokens_per_day": 10_000,
            "tokens_per_month": 10_000,
            "eur_per_month": 10.0,
            # This month's chats (4 x 6 tokens) leave 5.
            "models": {"fake-chat": {"tokens_per_day": 1000, "tokens_per_month": 29}},
        },
    )
    embed = {"model": "fake-embed", "input": "a b c"}
    headers = {"authorization": f"Bearer {key}"}

    def spend(chats: int) -> None:
        for _ in range(chats):
            assert chat(first, key).status_code == 200
        response = httpx.post(f"{first.url}/v1/embeddings", json=embed, headers=headers)
        assert response.status_code == 200

    spend(2)  # the month before
    clock.advance(24 * 3600)  # the 1st, noon
    spend(3)
    clock.advance(24 * 3600)  # the 2nd, noon
    spend(1)
    records = first.records()
    first.stop()
    if store == "redis":  # and Redis lost the tenant's keys while no gateway ran
        with redis.Redis.from_url(REDIS_URL) as client:
            client.delete(*_tenant_keys(client, tenant_id))

    again = gateway_factory(clock=clock, redis_url=redis_url, file=FILE)
    today, this_month = clock.now().date(), month.date()

    def used(model: str | None, since: Any, field: str) -> int:
        return sum(
            r[field]
            for r in records
            if (model is None or r["model"] == model)
            and datetime.fromisoformat(r["created_at"]).date() >= since
        )

    limits = _limits(again, "acme")
    expected = {
        "all:tpd": used(None, today, "total_tokens"),
        "all:tpmo": used(None, this_month, "total_tokens"),
        "all:eur": used(None, this_month, "cost_micro_eur"),
        "fake-chat:tpd": used("fake-chat", today, "total_tokens"),
        "fake-chat:tpmo": used("fake-chat", this_month, "total_tokens"),
    }
    assert {name: limits[name]["used"] for name in expected} == expected
    assert expected["all:tpd"] == 6 + 3 and expected["fake-chat:tpmo"] == 24  # as planned
    assert all(row["reserved"] == 0 for row in limits.values())
    assert_openai_error(chat(again, key), 429, "budget_tokens")  # fake-chat's month: 6 > 5
    assert chat(again, key, words=1).status_code == 200  # 5 tokens: last month not counted


# -- the stores, with the ledger's answer handed in -----------------------------------------


class Ledger:
    """What a seeding store asks: per budget check, what its period used (set by each test)."""

    def __init__(self, used: int = 0) -> None:
        self.used = used
        self.failing = False
        self.asked: list[str] = []

    async def __call__(self, checks: Sequence[Check]) -> list[int]:
        self.asked += [check.key for check in checks]
        await asyncio.sleep(0.01)  # gives concurrent admissions time to meet here
        if self.failing:
            raise StoreFailure("ledger: down")
        return [self.used for _ in checks]


def _budget(tenant: str, limit: int, cost: int, lease: float = 900.0) -> Check:
    return Check(
        f"sluis:q:{{{tenant}}}:all:tpd:2027-01-15",
        Kind.BUDGET,
        "budget_tokens",
        limit,
        cost,
        lease,
        period_end=T0 + 3600,
        limit_name="tokens_per_day",
    )


def _store(kind: str, ledger: Ledger) -> QuotaStore:
    if kind == "memory":
        return MemoryStore(seeds=ledger)
    return RedisStore(REDIS_URL, timeout_s=2.0, seeds=ledger)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_new_budget_is_seeded_once_however_many_admissions_meet(
    kind: str, tenant: str
) -> None:
    ledger = Ledger(used=500)
    # Four gateways sharing Redis; in process, one store.
    stores = [_store(kind, ledger) for _ in range(4 if kind == "redis" else 1)]
    check = _budget(tenant, 1000, 10)
    decisions = await asyncio.gather(
        *(stores[i % len(stores)].admit([check], f"r{i}", T0) for i in range(20))
    )
    assert all(d.allowed for d in decisions)
    [state] = await stores[0].state([check], T0)
    assert (state.used, state.reserved) == (500, 200)
    asked = len(ledger.asked)
    assert (await stores[0].admit([check], "r20", T0)).allowed
    assert len(ledger.asked) == asked  # seeded: the ledger is not asked again
    for store in stores:
        await store.aclose()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_ledger_that_cannot_answer_is_a_store_failure(kind: str, tenant: str) -> None:
    ledger = Ledger(used=990)
    ledger.failing = True
    store = _store(kind, ledger)
    check = _budget(tenant, 1000, 10)
    with pytest.raises(StoreFailure):
        await store.admit([check], "r1", T0)
    ledger.failing = False  # left unseeded: the next admission asks again
    assert (await store.admit([check], "r2", T0)).allowed
    assert not (await store.admit([check], "r3", T0)).allowed
    await store.aclose()


async def test_seeding_a_key_sets_its_use_and_leaves_reservations_alone(tenant: str) -> None:
    ledger = Ledger(used=0)
    store = RedisStore(REDIS_URL, timeout_s=2.0, seeds=ledger)
    connection = RespConnection(REDIS_URL, timeout_s=2.0, connections=1)
    check = _budget(tenant, 1000, 100)
    assert (await store.admit([check], "r1", T0)).allowed
    # A key as a gateway of the previous version left it (no seed mark), r1 still in flight.
    await connection.call("HDEL", check.key, "seeded")
    ledger.used = 300
    assert (await store.admit([check], "r2", T0 + 1)).allowed
    [state] = await store.state([check], T0 + 1)
    assert (state.used, state.reserved) == (300, 200)
    await store.settle([check], "r1", [80], admitted_at=T0, now=T0 + 2)
    [state] = await store.state([check], T0 + 2)
    assert (state.used, state.reserved) == (380, 100)
    await connection.aclose()
    await store.aclose()


async def test_every_key_the_scripts_write_has_a_ttl(tenant: str) -> None:
    store = RedisStore(REDIS_URL, timeout_s=2.0)
    connection = RespConnection(REDIS_URL, timeout_s=2.0, connections=1)
    checks = [
        window(tenant, 100),
        window(tenant, 10_000, cost=50, name="tpm"),
        _budget(tenant, 10_000, 50, lease=30),
        concurrency(tenant, 10, lease=30),
    ]
    for i in range(4):
        assert (await store.admit(checks, f"r{i}", T0 + i)).allowed
    await store.settle(checks, "r0", [1, 20, 20, 1], admitted_at=T0, now=T0 + 5)
    await store.settle(checks, "never", [1, 0, 0, 1], admitted_at=T0, now=T0 + 5)  # a mark

    async def keys_without_ttl() -> dict[str, int]:
        keys = await connection.call("KEYS", f"sluis:q:{{{tenant}}}*")
        assert len(keys) >= 4  # records, marks, windows, budgets, reservations, slots
        ttls = {key.decode(): await connection.call("PTTL", key) for key in keys}
        return {key: ttl for key, ttl in ttls.items() if ttl <= 0}

    assert await keys_without_ttl() == {}
    # The budget's key is lost (an eviction, a partial flush) while r1 and r2 are in flight:
    # r1 settles before the next admission seeds the key again, r2 after.
    await connection.call("DEL", checks[2].key)
    await store.settle(checks, "r1", [1, 30, 30, 1], admitted_at=T0 + 1, now=T0 + 6)
    assert await keys_without_ttl() == {}
    assert (await store.admit(checks, "r4", T0 + 7)).allowed
    await store.settle(checks, "r2", [1, 40, 40, 1], admitted_at=T0 + 2, now=T0 + 8)
    await store.state(checks, T0 + 60)  # r3's and r4's leases lapse
    assert await keys_without_ttl() == {}
    await connection.aclose()
    await store.aclose()
