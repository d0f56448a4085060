"""Billing periods: calendar months in UTC, named YYYY-MM."""

from __future__ import annotations

from datetime import UTC, datetime


def period_of(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m")


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def previous_month_start(at: datetime) -> datetime:
    start = month_start(at)
    return datetime(start.year - (start.month == 1), (start.month - 2) % 12 + 1, 1, tzinfo=UTC)


def next_month_start(at: datetime) -> datetime:
    start = month_start(at)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
