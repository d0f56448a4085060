"""What one admission asks of the quota store: a list of checks, applied all or nothing.

Three kinds, the same in every store:

- WINDOW (requests or tokens per minute): a sliding window of 60 buckets. An admission is counted
  for at least the whole window, so no 60-second span ever holds more than the limit, and there is
  no window-boundary doubling.
- BUDGET (tokens per day or month, money per month): `used + reserved + cost <= limit`. The cost
  is reserved at admission and reconciled to the actual usage at the end; a reservation also
  expires after its lease (renewed while the request runs), so a gateway that dies mid-request
  cannot leak it.
- CONCURRENCY: leases on in-flight requests, released at the end or expiring after the lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

WINDOW_BUCKETS = 60


class Kind(StrEnum):
    WINDOW = "window"
    BUDGET = "budget"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True, slots=True)
class Check:
    key: str
    kind: Kind
    code: str
    limit: int
    cost: int
    # WINDOW: the window's length. BUDGET and CONCURRENCY: how long a reservation lives.
    span_s: float
    # BUDGET: when the period ends (epoch seconds): the counter's reset, and its expiry.
    period_end: float = 0.0
    # What it enforces: the policy's field (e.g. "tokens_per_day"), for the whole tenant
    # (model None) or for one of its models.
    limit_name: str = ""
    model: str | None = None

    @property
    def bucket_s(self) -> float:
        return self.span_s / WINDOW_BUCKETS


@dataclass(frozen=True, slots=True)
class CheckState:
    limit: int
    used: int
    reserved: int
    reset_s: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    states: tuple[CheckState, ...] = ()
    failed: int | None = None
    retry_after_s: float = 0.0
    # The check could never pass, whatever the wait (its cost alone is over the limit).
    never: bool = False
    # Decided by this gateway without a store call (`quotas/allowances.py`): admitted from its
    # allowance, or refused again while a full requests window stays full.
    local: bool = False


def window_retry_after(buckets: dict[int, int], check: Check, used: int, now: float) -> float:
    """Seconds until enough old buckets leave the window for `check.cost` to fit."""
    excess = used + check.cost - check.limit
    width = check.bucket_s
    freed = 0
    for index in sorted(buckets):
        freed += buckets[index]
        if freed >= excess:
            return max(0.0, (index + WINDOW_BUCKETS + 1) * width - now)
    return check.span_s
