"""Reading Prometheus' HTTP API: instant queries at a given time."""

from __future__ import annotations

from datetime import datetime

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
        try:
            response = self._client.get(
                f"{self._url}/api/v1/query", params={"query": expression, "time": at.timestamp()}
            )
        except httpx.TransportError as exc:
            raise BillingError(
                f"cannot reach Prometheus at {self._url}: {exc}", exit_code=3
            ) from exc
        if response.status_code != 200:
            raise BillingError(
                f"Prometheus refused the query ({response.status_code}): {response.text[:200]}",
                exit_code=3,
            )
        result = response.json()["data"]["result"]
        return {
            tuple(value for _, value in sorted(series["metric"].items())): float(series["value"][1])
            for series in result
        }

    def close(self) -> None:
        self._client.close()
