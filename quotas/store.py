"""The quota store contract, and the stores by name (`SLUIS_REDIS_URL` picks redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from quotas.checks import Check, CheckState, Decision


class StoreFailure(Exception):
    """The quota store could not answer (down, timed out); the fail mode decides what follows."""


class QuotaStore(Protocol):
    """Every call either answers or raises `StoreFailure` within the store's timeout (a store
    that does I/O bounds it itself: the Redis store per connection attempt and per call)."""

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
        """Replace the reserved costs of an admission by what was actually used."""
        ...

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
