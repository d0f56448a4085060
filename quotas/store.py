"""The quota store contract, and the stores by name (`SLUIS_REDIS_URL` picks redis)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from quotas.checks import Check, CheckState, Decision


class StoreFailure(Exception):
    """The quota store could not answer (down, timed out); the fail mode decides what follows."""


# What a store asks of the usage ledger for each budget key it finds unseeded, new to it (a new
# period, a start) or lost (Redis restarted empty, flushed, evicted): per budget check, what its
# scope used in its period (`quotas/seeding.py`). Raises `StoreFailure` when it cannot tell.
SeedSource = Callable[[Sequence[Check]], Awaitable[Sequence[int]]]


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

    async def renew(self, checks: Sequence[Check], request_ids: Sequence[str], now: float) -> None:
        """Extend the leases (budget reservations, concurrency slots: a concurrency check's
        cost is the slots each holds) of these admissions to `now` plus their span: the
        gateway still runs them. Never shortens one, and changes nothing for an admission
        settled, never made, or whose lease has lapsed already."""
        ...

    async def split(
        self,
        checks: Sequence[Check],
        request_id: str,
        actual: Sequence[int],
        rest_id: str,
        rest: Sequence[int],
        now: float,
    ) -> None:
        """Settle an admission's finished part and hand what still runs to an admission of its
        own, in one step: as `settle` with `actual`, and `rest_id` then holds `rest` per check
        (reserved, slots, or counted in the admission's window bucket), counted when the first
        was, leased from `now`, with no limit check (the room was granted already); where the
        first's lease had lapsed, the rest holds nothing of that check. Exactly once like a
        settle: a repeat, or a split of what was settled, changes nothing."""
        ...

    async def state(self, checks: Sequence[Check], now: float) -> list[CheckState]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
