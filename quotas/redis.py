"""The Redis quota store: one Lua script per admission and one per reconciliation, each one
round trip and atomic, so any number of gateways share exact limits.

Every key of a tenant carries the hash tag `{<tenant id>}`, so a script's keys live on one slot
of a Redis Cluster. Every key has a TTL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from quotas.checks import Check, CheckState, Decision, Kind
from quotas.store import StoreFailure

_ADMIT = (Path(__file__).parent / "redis_admit.lua").read_text()
_SETTLE = (Path(__file__).parent / "redis_settle.lua").read_text()


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        # One immediate retry, on a fresh connection, when a pooled one turns out dead (as after
        # a Redis restart); never on a timeout, when the script may have run.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[ConnectionError],
            health_check_interval=30,
        )
        self._admit = self._client.register_script(_ADMIT)
        self._settle = self._client.register_script(_SETTLE)

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        raw = await self._run(
            self._admit, _keys(checks), [now, request_id, "admit", *_check_args(checks)]
        )
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
        args: list[Any] = [now, request_id, admitted_at]
        for check, spent in zip(checks, actual, strict=True):
            args += [check.kind.value, check.span_s, check.cost, spent]
        await self._run(self._settle, _keys(checks), args)

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        raw = await self._run(self._admit, _keys(checks), [now, "-", "state", *_check_args(checks)])
        return list(_states(raw[4:], checks))

    async def ping(self) -> None:
        await self._run(None, [], [])

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            if script is None:
                return await self._client.ping()
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreFailure(f"redis: {type(exc).__name__}: {exc}") from exc


def _keys(checks: Sequence[Check]) -> list[str]:
    keys = []
    for check in checks:
        keys += [check.key, check.key + ":r"]
    return keys


def _check_args(checks: Sequence[Check]) -> list[Any]:
    args: list[Any] = []
    for check in checks:
        args += [check.kind.value, check.limit, check.cost, check.span_s, check.period_end]
    return args


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


__all__ = ["Kind", "RedisStore"]
