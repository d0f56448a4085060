"""One contract for the tenancy store, run on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keys import parse_key, secret_matches
from gateway.tenancy.audit import AuditLog
from gateway.tenancy.database import Database
from gateway.tenancy.ledger import Ledger, UsageFilter
from gateway.tenancy.tenants import PreconditionFailed, TenantStore
from gateway.usage import UsageRecord


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/store.db"
    else:
        url = request.getfixturevalue("postgres_url")
    db = Database.from_url(url)
    await db.migrate()
    yield db
    if request.param == "postgresql":
        async with db.engine.begin() as conn:
            from gateway.tenancy.tables import metadata

            for table in reversed(metadata.sorted_tables):
                await conn.execute(table.delete())
    await db.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 15, 12, 0, tzinfo=UTC))


@pytest.fixture
def store(database: Database, clock: ManualClock) -> TenantStore:
    return TenantStore(database, clock)


async def test_migrations_are_idempotent(database: Database) -> None:
    await database.migrate()
    await database.ping()


async def test_tenant_lifecycle(store: TenantStore, clock: ManualClock) -> None:
    created = await store.create_tenant(
        "acme", models=("tiny-chat",), metadata={"tier": "sme"}, actor="ops"
    )
    assert created.id.startswith("ten_")
    assert created.created_at == clock.now()
    assert await store.get_tenant("acme") == created
    assert await store.get_tenant(created.id) == created
    with pytest.raises(Conflict):
        await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    with pytest.raises(InvalidRequest):
        await store.create_tenant("Not A Slug", models=(), metadata={}, actor="ops")
    with pytest.raises(NotFound):
        await store.get_tenant("nobody")
    clock.advance(10)
    updated = await store.update_tenant(
        "acme", actor="ops", models=("tiny-chat", "tiny-embed"), status="suspended"
    )
    assert updated.models == ("tiny-chat", "tiny-embed")
    assert updated.status == "suspended"
    assert updated.updated_at == clock.now()
    assert updated.metadata == {"tier": "sme"}
    assert [t.name for t in await store.list_tenants()] == ["acme"]


async def test_keys_store_only_a_hash(store: TenantStore, database: Database) -> None:
    await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    key, plaintext = await store.create_key("acme", actor="ops", name="ci")
    parsed = parse_key(plaintext)
    assert parsed is not None and parsed.public_id == key.id
    grant = await store.grant_for(key.id)
    assert grant is not None
    assert secret_matches(parsed, grant.secret_hash)
    assert parsed.secret not in grant.secret_hash
    async with database.engine.connect() as conn:
        from sqlalchemy import text

        dump = str((await conn.execute(text("SELECT * FROM api_keys"))).all())
    assert parsed.secret not in dump
    assert await store.grant_for("zzzzzzzzzzzz") is None


async def test_rotation_grace_and_revocation(store: TenantStore, clock: ManualClock) -> None:
    await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    old, _ = await store.create_key("acme", actor="ops")
    new, _, old_after = await store.rotate_key(old.id, actor="ops", grace=timedelta(hours=1))
    assert old_after.rotated_to == new.id
    assert old_after.expires_at == clock.now() + timedelta(hours=1)
    assert old_after.usable_at(clock.now()) and new.usable_at(clock.now())
    clock.advance(3601)
    assert not old_after.usable_at(clock.now())
    with pytest.raises(Conflict):
        await store.rotate_key(old.id, actor="ops", grace=timedelta(hours=1))
    revoked = await store.revoke_key(new.id, actor="ops")
    assert revoked.revoked_at == clock.now()
    assert not revoked.usable_at(clock.now())
    assert [k.id for k in await store.list_keys("acme")] == [old.id, new.id]


async def test_every_change_is_audited(store: TenantStore, database: Database) -> None:
    await store.create_tenant("acme", models=(), metadata={}, actor="alice")
    key, _ = await store.create_key("acme", actor="alice")
    await store.update_tenant("acme", actor="bob", status="suspended")
    await store.rotate_key(key.id, actor="bob", grace=timedelta(0))
    await store.revoke_key(key.id, actor="carol")
    entries = await AuditLog(database).entries()
    assert [(e.actor, e.action) for e in reversed(entries)] == [
        ("alice", "tenant.create"),
        ("alice", "key.create"),
        ("bob", "tenant.suspend"),
        ("bob", "key.rotate"),
        ("carol", "key.revoke"),
    ]


def _record(
    request_id: str,
    tenant_id: str,
    at: datetime,
    prompt: int = 3,
    completion: int = 5,
    model: str = "tiny-chat",
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        tenant_id=tenant_id,
        key_id="k",
        model=model,
        endpoint="chat/completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        status=200,
        outcome="ok",
        usage_exact=True,
        ttft_ms=1.5,
        duration_ms=9.25,
        created_at=at,
    )


async def test_ledger_is_idempotent_by_request_id(
    store: TenantStore, database: Database, clock: ManualClock
) -> None:
    tenant = await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    ledger = Ledger(database)
    first = _record("req_1", tenant.id, clock.now())
    await ledger.write([first, _record("req_2", tenant.id, clock.now())])
    await ledger.write([replace(first, completion_tokens=999)])  # a replay must not change it
    [total] = await ledger.totals(UsageFilter())
    assert (total.requests, total.prompt_tokens, total.completion_tokens) == (2, 6, 10)
    [stored] = await ledger.records(UsageFilter(request_id="req_1"))
    assert stored == first


async def test_ledger_totals_by_period_tenant_and_model(
    store: TenantStore, database: Database
) -> None:
    acme = await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    city = await store.create_tenant("city", models=(), metadata={}, actor="ops")
    ledger = Ledger(database)
    oct31 = datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    nov1 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    await ledger.write(
        [
            _record("a", acme.id, oct31),
            _record("b", acme.id, nov1),
            _record("c", acme.id, nov1, model="tiny-embed", completion=0),
            _record("d", city.id, nov1 + timedelta(days=29, hours=23)),
        ]
    )
    november = UsageFilter(start=nov1, end=datetime(2026, 12, 1, tzinfo=UTC))
    totals = {
        (t.tenant, t.model): (t.requests, t.prompt_tokens, t.completion_tokens)
        for t in await ledger.totals(november)
    }
    assert totals == {
        ("acme", "tiny-chat"): (1, 3, 5),
        ("acme", "tiny-embed"): (1, 3, 0),
        ("city", "tiny-chat"): (1, 3, 5),
    }
    only_acme_chat = await ledger.totals(replace(november, tenant_id=acme.id, model="tiny-chat"))
    assert [(t.requests, t.prompt_tokens) for t in only_acme_chat] == [(1, 3)]


async def test_ledger_usage_per_model_in_a_period_for_quota_seeds(database: Database) -> None:
    ledger = Ledger(database)
    nov1, dec1 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    priced = [replace(_record(f"r{i}", "ten_a", nov1), cost_micro_eur=7) for i in range(3)]
    await ledger.write(
        [
            _record("before", "ten_a", nov1 - timedelta(microseconds=1)),
            *priced,
            _record("embed", "ten_a", dec1 - timedelta(microseconds=1), model="tiny-embed"),
            _record("after", "ten_a", dec1),
            _record("other", "ten_b", nov1),
        ]
    )
    used = {u.model: (u.tokens, u.cost_micro_eur) for u in await ledger.used("ten_a", nov1, dec1)}
    assert used == {"tiny-chat": (3 * 8, 3 * 7), "tiny-embed": (8, 0)}
    held_elsewhere = await ledger.used("ten_a", nov1, dec1, excluding=["r0", "r1", "embed"])
    assert [(u.model, u.tokens, u.cost_micro_eur) for u in held_elsewhere] == [("tiny-chat", 8, 7)]
    assert await ledger.used("ten_c", nov1, dec1) == []


async def test_quota_patches_merge_and_every_update_has_its_own_version(
    store: TenantStore, clock: ManualClock
) -> None:
    created = await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    assert created.version == 1
    first = await store.update_tenant("acme", actor="ops", quota_patch={"tokens_per_day": 5})
    second = await store.update_tenant("acme", actor="ops", quota_patch={"max_concurrent": 3})
    # The clock did not move: versions and update times must still differ, since caches key on them.
    assert (first.version, second.version) == (2, 3)
    assert created.updated_at < first.updated_at < second.updated_at
    assert second.quotas == {"tokens_per_day": 5, "max_concurrent": 3}
    third = await store.update_tenant(
        "acme", actor="ops", quota_patch={"tokens_per_day": None, "max_concurrent": "unlimited"}
    )
    assert third.quotas == {"max_concurrent": None}  # stored None: unlimited (quotas/policy.py)
    assert third.to_json()["quotas"] == {"max_concurrent": "unlimited"}
    assert await store.get_tenant("acme") == third
    grant_key, _ = await store.create_key("acme", actor="ops")
    grant = await store.grant_for(grant_key.id)
    assert grant is not None and grant.tenant == third


async def test_a_stale_version_changes_nothing(store: TenantStore, database: Database) -> None:
    await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    current = await store.update_tenant("acme", actor="ops", quota_patch={"tokens_per_day": 5})
    with pytest.raises(PreconditionFailed) as refused:
        await store.update_tenant(
            "acme",
            actor="ops",
            status="suspended",
            quota_patch={"tokens_per_day": 6},
            expected_versions=frozenset({1}),
        )
    assert refused.value.status_code == 412 and refused.value.code == "precondition_failed"
    assert await store.get_tenant("acme") == current
    assert len(await AuditLog(database).entries()) == 2
    updated = await store.update_tenant(
        "acme", actor="ops", status="suspended", expected_versions=frozenset({current.version})
    )
    assert (updated.status, updated.version) == ("suspended", current.version + 1)


async def test_concurrent_quota_patches_all_survive(store: TenantStore) -> None:
    await store.create_tenant("acme", models=(), metadata={}, actor="ops")
    patches: list[dict[str, object]] = [
        {"requests_per_minute": 1},
        {"tokens_per_minute": 2},
        {"max_concurrent": 3},
        {"tokens_per_day": 4},
        {"tokens_per_month": 5},
        {"eur_per_month": 6.5},
        {"models": {"tiny-chat": {"max_concurrent": 7}}},
        {"models": {"tiny-chat": {"tokens_per_day": 8}}},
        {"models": {"tiny-embed": {"requests_per_minute": 9}}},
    ]
    await asyncio.gather(
        *(store.update_tenant("acme", actor="ops", quota_patch=patch) for patch in patches)
    )
    tenant = await store.get_tenant("acme")
    assert tenant.quotas == {
        "requests_per_minute": 1,
        "tokens_per_minute": 2,
        "max_concurrent": 3,
        "tokens_per_day": 4,
        "tokens_per_month": 5,
        "eur_per_month": 6.5,
        "models": {
            "tiny-chat": {"max_concurrent": 7, "tokens_per_day": 8},
            "tiny-embed": {"requests_per_minute": 9},
        },
    }
    assert tenant.version == 1 + len(patches)
