"""The Redis quota store: one Lua script per admission and one per reconciliation, each one
round trip and atomic, so any number of gateways share exact limits.

Every key of a tenant carries the hash tag `{<tenant id>}`, so a script's keys live on one slot
of a Redis Cluster. Every key has a TTL.

Exactly once in effect, whatever the network does:
- An admission leaves a record under its request id, and the settle that finds it deletes it:
  a settle retried after a lost reply, or repeated at shutdown, changes nothing; an admission
  sent twice is applied once.
- An admission that fails or is cancelled once its command may have gone out is compensated:
  the store settles it with nothing used, retrying in the background until Redis answers. A
  settle that finds no record leaves a mark that keeps the admission, should it still reach
  Redis later (on a connection that was dropped), from applying anything.
- Renewals (`redis_renew.lua`) only extend leases still live, and splits (`redis_split.lua`)
  consume the admission's record like a settle: both may be repeated.
- A call that times out gives up its own answer, not the connection (`quotas/resp.py`), so
  one slow reply fails no other call. Admissions and settles have their own timeouts (settles
  run after the answer has gone out, and may wait longer).
- Time is Redis's: the store measures the offset between the gateway's clock and Redis `TIME`
  (again every minute) and moves the times it is handed by it, in whole seconds (the finest
  window bucket, so gateway and Redis buckets stay aligned). Windows, leases and reservations
  then agree across gateways whatever their clocks. The budget keys' names (the day, the month)
  are still chosen by the gateway from its own clock (`quotas/plan.py`), so a gateway off by
  `s` seconds books the requests of the `s` seconds around midnight to the neighbouring day;
  the store logs the offset whenever it is a second or more.

Budgets survive the loss of Redis's data: each budget key carries a `seeded` field, set when
it was seeded from the usage ledger. The admission script finds a key without it (a new day or
month, or a key lost to a restart without persistence, a flush, an eviction) at no extra cost,
applies nothing and names it; the store then asks the ledger what that budget's scope used in
its period (`quotas/seeding.py`), seeds the key if no other gateway did meanwhile
(`redis_seed.lua`: `used` only, reservations left alone) and runs the admission again. A settle
never recreates a lost key (it would have no TTL and count from zero): the ledger has its usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from quotas.checks import Check, CheckState, Decision, Kind
from quotas.resp import RespConnection, RespError
from quotas.store import SeedSource, StoreFailure

log = logging.getLogger("sluis.quotas")

_ADMIT = (Path(__file__).parent / "redis_admit.lua").read_text()
_SETTLE = (Path(__file__).parent / "redis_settle.lua").read_text()
_SEED = (Path(__file__).parent / "redis_seed.lua").read_text()
_RENEW = (Path(__file__).parent / "redis_renew.lua").read_text()
_SPLIT = (Path(__file__).parent / "redis_split.lua").read_text()

DEAD_AFTER_S = 5.0  # a connection that answers nothing for this long is dropped
RESYNC_S = 60.0  # how often the offset to Redis's clock is measured again
_COMPENSATION_RETRIES_S = (0.5, 1, 2, 5, 10, 30)
MAX_COMPENSATIONS = 10_000  # pending at once; beyond, the oldest are left to their leases
RENEW_BATCH = 256  # request ids per renewal script: a script blocks Redis while it runs
SEED_ATTEMPTS = 2  # seedings of one admission's budgets, should they be lost again at once


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        settle_timeout_s: float | None = None,
        clock: Callable[[], float] = time.time,
        seeds: SeedSource | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._seeds = seeds
        self._settle_timeout_s = settle_timeout_s or timeout_s
        self._connection = RespConnection(
            url,
            timeout_s=max(timeout_s, self._settle_timeout_s),  # each call is bounded here
            dead_after_s=max(DEAD_AFTER_S, 2 * self._settle_timeout_s),
        )
        self._scripts = {
            name: (hashlib.sha1(text.encode()).hexdigest(), text)
            for name, text in (
                ("admit", _ADMIT),
                ("settle", _SETTLE),
                ("seed", _SEED),
                ("renew", _RENEW),
                ("split", _SPLIT),
            )
        }
        self._clock = clock
        self._offset = 0.0  # Redis's clock minus the gateway's, whole seconds
        self._synced_at: float | None = None  # monotonic
        self._syncing = asyncio.Lock()
        # Admissions to undo (request id: checks, monotonic time given up), oldest first.
        self._compensations: dict[str, tuple[list[Check], float]] = {}
        self._compensator: asyncio.Task[None] | None = None
        self._overflowing = False

    @property
    def offset_s(self) -> float:
        """How far Redis's clock is ahead of the gateway's (whole seconds, as applied)."""
        return self._offset

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        keys = _keys(checks, request_id)
        specs = _check_args(checks)
        try:
            raw = await self._admission(
                checks, keys, lambda: [now + self._offset, request_id, "admit", *specs]
            )
        except BaseException as exc:
            # Its command may have reached Redis and run: undo it (a no-op if it did not).
            if not isinstance(exc.__cause__, ConnectionRefusedError):  # surely never sent
                self._compensate(checks, request_id)
            raise
        allowed, failed, retry_ms, never = (int(v) for v in raw[:4])
        states = _states(raw[4:], checks if allowed else [checks[failed - 1]])
        if allowed:
            return Decision(allowed=True, states=states)
        return Decision(
            allowed=False,
            failed=failed - 1,
            retry_after_s=retry_ms / 1000,
            never=bool(never),
            states=states,
        )

    async def settle(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        admitted_at: float,
        now: float,
    ) -> None:
        # The admission's record knows when it was counted (on Redis's clock): the times
        # handed in are not needed.
        await self._call(self._settle_timeout_s, lambda: self._settle(checks, request_id, actual))

    async def renew(self, checks: Sequence[Check], request_ids: Sequence[str], now: float) -> None:
        leased = [check for check in checks if check.kind is not Kind.WINDOW]
        if not leased:
            return
        for start in range(0, len(request_ids), RENEW_BATCH):
            await self._renew(leased, request_ids[start : start + RENEW_BATCH], now)

    async def split(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        rest_id: str,
        rest: Sequence[int],
        now: float,
    ) -> None:
        keys = [_record_key(checks, request_id), *_keys(checks, rest_id)]
        specs = [
            f"{c.kind.value} {c.span_s!r} {c.cost} {spent} {part}"
            for c, spent, part in zip(checks, actual, rest, strict=True)
        ]
        await self._call(
            self._settle_timeout_s,
            lambda: self._script("split", keys, [now + self._offset, request_id, rest_id, *specs]),
        )

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        keys, specs = _keys(checks, "-"), _check_args(checks)
        raw = await self._admission(
            checks, keys, lambda: [now + self._offset, "-", "state", *specs]
        )
        return list(_states(raw[4:], checks))

    async def ping(self) -> None:
        await self._call(self._timeout_s, lambda: self._connection.call("PING"), sync=False)

    async def aclose(self) -> None:
        if self._compensator is not None:
            self._compensator.cancel()
            await asyncio.gather(self._compensator, return_exceptions=True)
        try:
            # One last try for each admission still to undo, within one settle timeout in all.
            async with asyncio.timeout(self._settle_timeout_s):
                for request_id, (checks, _) in list(self._compensations.items()):
                    await self._settle(checks, request_id, [0] * len(checks))
                    del self._compensations[request_id]
        except (RespError, OSError, TimeoutError) as exc:
            log.error(
                "%d cancelled or failed quota admissions left to their leases (%s)",
                len(self._compensations),
                exc or type(exc).__name__,
            )
        await self._connection.aclose()

    async def _call(
        self, timeout_s: float, call: Callable[[], Awaitable[Any]], *, sync: bool = True
    ) -> Any:
        """One call within one timeout (with the clock measurement it may need first); every
        error from Redis, the network or the timeout comes out as `StoreFailure`."""
        try:
            async with asyncio.timeout(timeout_s):
                if sync:
                    await self._sync_clock()
                return await call()
        except TimeoutError as exc:
            raise StoreFailure(f"redis: no answer within {timeout_s} s") from exc
        except (RespError, OSError) as exc:
            raise StoreFailure(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _admission(
        self, checks: Sequence[Check], keys: list[str], args: Callable[[], list[Any]]
    ) -> Any:
        """The admission script's answer once every budget key it reads is seeded: one that it
        finds unseeded (new, or lost) is seeded from the ledger first, then it runs again."""
        seeded = 0
        while True:
            raw = await self._call(self._timeout_s, lambda: self._script("admit", keys, args()))
            if int(raw[0]) >= 0:
                return raw
            if seeded == SEED_ATTEMPTS:
                raise StoreFailure("redis: budget keys lost again as soon as they were seeded")
            await self._seed([checks[int(index) - 1] for index in raw[1:]])
            seeded += 1

    async def _seed(self, checks: Sequence[Check]) -> None:
        """Seed budget keys with the ledger's count, where no other gateway did first."""
        used = [0] * len(checks) if self._seeds is None else await self._seeds(checks)
        keys = [check.key for check in checks]
        specs = [f"{int(n)} {c.period_end!r}" for c, n in zip(checks, used, strict=True)]
        await self._call(
            self._timeout_s,
            lambda: self._script("seed", keys, [self._clock() + self._offset, *specs]),
        )

    async def _renew(self, leased: Sequence[Check], batch: Sequence[str], now: float) -> None:
        keys = _keys(leased, "-")[1:] + [_record_key(leased, request_id) for request_id in batch]
        specs = [f"{c.kind.value} {c.span_s!r} {c.cost}" for c in leased]
        await self._call(
            self._settle_timeout_s,  # in the background, as settles
            lambda: self._script("renew", keys, [now + self._offset, len(specs), *specs, *batch]),
        )

    async def _settle(
        self, checks: Sequence[Check], request_id: str, actual: Sequence[int]
    ) -> None:
        # A window whose reservation was exact (always so for requests) has nothing to settle.
        pairs = [
            (check, spent)
            for check, spent in zip(checks, actual, strict=True)
            if check.kind is not Kind.WINDOW or spent != check.cost
        ]
        if not pairs:
            return
        args = [request_id]
        args += [f"{c.kind.value} {c.span_s!r} {c.cost} {spent}" for c, spent in pairs]
        await self._script("settle", _keys([c for c, _ in pairs], request_id), args)

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        sha, text = self._scripts[name]
        try:
            return await self._connection.call("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # A restarted Redis has forgotten the script: send it whole, once.
            return await self._connection.call("EVAL", text, len(keys), *keys, *args)

    async def _sync_clock(self) -> None:
        """Measure the offset to Redis's clock when due (at first use, then every minute)."""
        if self._synced_at is not None and time.monotonic() - self._synced_at < RESYNC_S:
            return
        async with self._syncing:
            if self._synced_at is not None and time.monotonic() - self._synced_at < RESYNC_S:
                return
            before = self._clock()
            seconds, micros = await self._connection.call("TIME")
            after = self._clock()
            measured = int(seconds) + int(micros) / 1e6 - (before + after) / 2
            # Whole seconds, and moved only by a clear change: measurement noise around a
            # half second must not move every bucket back and forth.
            if self._synced_at is None or abs(measured - self._offset) > 0.75:
                offset = float(round(measured))
                if offset != self._offset:
                    log.warning(
                        "this gateway's clock is %+.0f s off Redis's: quota windows and leases "
                        "follow Redis, budget periods (day, month) this gateway's clock",
                        -offset,
                    )
                self._offset = offset
            self._synced_at = time.monotonic()

    def _compensate(self, checks: Sequence[Check], request_id: str) -> None:
        if len(self._compensations) >= MAX_COMPENSATIONS:
            del self._compensations[next(iter(self._compensations))]
            if not self._overflowing:
                self._overflowing = True
                log.error(
                    "over %d quota admissions to undo: the oldest are left to their leases",
                    MAX_COMPENSATIONS,
                )
        self._compensations[request_id] = (list(checks), time.monotonic())
        if self._compensator is None or self._compensator.done():
            self._compensator = asyncio.create_task(self._compensate_all())

    async def _compensate_all(self) -> None:
        """Settle every given-up admission with nothing used, oldest first; while Redis fails,
        wait longer and longer. One whose holdings have all lapsed is dropped."""
        failures = 0
        while self._compensations:
            request_id, (checks, since) = next(iter(self._compensations.items()))
            if time.monotonic() - since > max(check.span_s for check in checks):
                del self._compensations[request_id]
                log.error("gave up undoing quota admission %s: left to its lease", request_id)
                continue
            try:
                await self.settle(checks, request_id, [0] * len(checks), 0.0, 0.0)
            except StoreFailure as exc:
                delay = _COMPENSATION_RETRIES_S[min(failures, len(_COMPENSATION_RETRIES_S) - 1)]
                failures += 1
                log.warning("undoing quota admission failed (%s); retrying in %s s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            if self._compensations.get(request_id, (None, None))[1] == since:
                del self._compensations[request_id]
        self._overflowing = False


def _record_key(checks: Sequence[Check], request_id: str) -> str:
    """The admission record's key, in the tenant's hash slot (its keys' `{...}` tag)."""
    first = checks[0].key
    end = first.find("}")
    prefix = first[: end + 1] if 0 <= first.find("{") < end else first
    return f"{prefix}:rq:{request_id}"


def _keys(checks: Sequence[Check], request_id: str) -> list[str]:
    keys = [_record_key(checks, request_id)]
    for check in checks:
        keys.append(check.key)
        if check.kind is Kind.BUDGET:
            keys.append(check.key + ":r")
    return keys


def _check_args(checks: Sequence[Check]) -> list[str]:
    return [f"{c.kind.value} {c.limit} {c.cost} {c.span_s!r} {c.period_end!r}" for c in checks]


def _states(flat: Sequence[Any], checks: Sequence[Check]) -> tuple[CheckState, ...]:
    return tuple(
        CheckState(
            limit=check.limit,
            used=int(flat[3 * i]),
            reserved=int(flat[3 * i + 1]),
            reset_s=int(flat[3 * i + 2]) / 1000,
        )
        for i, check in enumerate(checks)
    )
