"""Reading Prometheus' HTTP API: instant and range queries at given times."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx


class BillingError(Exception):
    """An invoice cannot be made; the message says why. `exit_code` for the CLI."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PrometheusReader:
    def __init__(
        self, url: str, *, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s, transport=transport)

    def vector(self, expression: str, at: datetime) -> dict[tuple[str, ...], float]:
        """`expression` evaluated at `at`: each series' label values (sorted by name) -> value."""
        result = self._get("query", {"query": expression, "time": at.timestamp()})
        return {
            tuple(value for _, value in sorted(series["metric"].items())): float(series["value"][1])
            for series in result
        }

    def matrix(
        self, expression: str, start: datetime, end: datetime, step_s: float
    ) -> dict[tuple[tuple[str, str], ...], list[float]]:
        """A range query: each series' labels -> the timestamps it has a value at."""
        result = self._get(
            "query_range",
            {
                "query": expression,
                "start": start.timestamp(),
                "end": end.timestamp(),
                "step": step_s,
            },
        )
        return {
            tuple(sorted(series["metric"].items())): [float(t) for t, _ in series["values"]]
            for series in result
        }

    def close(self) -> None:
        self._client.close()

    def _get(self, endpoint: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            response = self._client.get(f"{self._url}/api/v1/{endpoint}", params=params)
        except httpx.TransportError as exc:
            raise BillingError(
                f"cannot reach Prometheus at {self._url}: {exc}", exit_code=3
            ) from exc
        if response.status_code != 200:
            raise BillingError(
                f"Prometheus refused the query ({response.status_code}): {response.text[:200]}",
                exit_code=3,
            )
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result
