"""The quota store contract, and the stores by name (`SLUIS_REDIS_URL` picks redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from quotas.checks import Check, CheckState, Decision


class StoreFailure(Exception):
    """The quota store could not answer (down, timed out); the fail mode decides what follows."""


class QuotaStore(Protocol):
    """Every call either answers or raises `StoreFailure` within the store's timeout (a store
    that does I/O bounds it itself: the Redis store per connection attempt and per call, with
    a longer timeout for settles).

    Calls are exactly once in effect per request id, so callers may retry and must not fear a
    lost answer: an admission is applied at most once; the first settle of an admitted request
    replaces its reservations, any later one changes nothing; a settle of a request that was
    never admitted changes nothing and keeps that admission from applying should it arrive
    later. A store whose admission can fail or be cancelled after its command left (Redis)
    undoes it itself, with such a settle."""

    async def admit(self, checks: Sequence[Check], request_id: str, now: float) -> Decision:
        """Apply every check's cost if all of them fit, else none."""
        ...

    async def settle(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        admitted_at: float,
        now: float,
    ) -> None:
        """Replace the reserved costs of an admission by what was actually used (windows in
        the bucket the store counted the admission in, whatever `admitted_at` says)."""
        ...

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
