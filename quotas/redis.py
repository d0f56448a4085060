"""The Redis quota store: one Lua script per admission and one per reconciliation, each one
round trip and atomic, so any number of gateways share exact limits. Calls go over one
pipelined connection (`quotas/resp.py`).

Every key of a tenant carries the hash tag `{<tenant id>}`, so a script's keys live on one slot
of a Redis Cluster. Every key has a TTL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quotas.checks import Check, CheckState, Decision, Kind
from quotas.resp import RespConnection, RespError
from quotas.store import StoreFailure

_ADMIT = (Path(__file__).parent / "redis_admit.lua").read_text()
_SETTLE = (Path(__file__).parent / "redis_settle.lua").read_text()


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._connection = RespConnection(url, timeout_s=timeout_s)
        self._scripts = {
            name: (hashlib.sha1(text.encode()).hexdigest(), text)
            for name, text in (("admit", _ADMIT), ("settle", _SETTLE))
        }

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        raw = await self._run(
            "admit", _keys(checks), [now, request_id, "admit", *_check_args(checks)]
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
        # A window whose reservation was exact (always so for requests) has nothing to settle.
        pairs = [
            (check, spent)
            for check, spent in zip(checks, actual, strict=True)
            if check.kind is not Kind.WINDOW or spent != check.cost
        ]
        if not pairs:
            return
        args: list[Any] = [now, request_id, admitted_at]
        args += [f"{c.kind.value} {c.span_s!r} {c.cost} {spent}" for c, spent in pairs]
        await self._run("settle", _keys([check for check, _ in pairs]), args)

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]:
        raw = await self._run("admit", _keys(checks), [now, "-", "state", *_check_args(checks)])
        return list(_states(raw[4:], checks))

    async def ping(self) -> None:
        await self._run(None, [], [])

    async def aclose(self) -> None:
        await self._connection.aclose()

    async def _run(self, script: str | None, keys: list[str], args: list[Any]) -> Any:
        try:
            if script is None:
                return await self._connection.call("PING")
            sha, text = self._scripts[script]
            try:
                return await self._connection.call("EVALSHA", sha, len(keys), *keys, *args)
            except RespError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # A restarted Redis has forgotten the script: send it whole, once.
                return await self._connection.call("EVAL", text, len(keys), *keys, *args)
        except (RespError, OSError, TimeoutError) as exc:
            raise StoreFailure(f"redis: {type(exc).__name__}: {exc}") from exc


def _keys(checks: Sequence[Check]) -> list[str]:
    keys = []
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
