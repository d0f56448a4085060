"""The real stack (Ray Serve + vLLM CPU + the tiny models), started once per test session with
the repository's own `sluis.yaml` and `sluis up`, exactly as a newcomer's `make run` starts it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.processes import SluisUp
from tests.clients import admin_request
from tests.otlp import OtlpReceiver

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RealStack:
    up: SluisUp
    traces: OtlpReceiver  # the stack exports its spans (gateway and vLLM) here

    @property
    def url(self) -> str:
        return self.up.url

    @property
    def key(self) -> str:
        return self.up.key

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return admin_request(self.url, self.up.admin_token, method, path, **kwargs)

    def record(self, request_id: str, timeout: float = 15) -> dict[str, Any]:
        """The ledger's usage record of one request, once metering has written it."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.admin("GET", "/usage/records", params={"limit": "10000"})
            assert response.status_code == 200, response.text
            for record in response.json()["data"]:
                if record["request_id"] == request_id:
                    return dict(record)
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage record for {request_id}")
            time.sleep(0.2)

    def stream(self, path: str, body: dict[str, Any]) -> AbstractContextManager[httpx.Response]:
        """A streamed request as a raw HTTP client sees it (headers, each SSE line)."""
        return httpx.stream(
            "POST",
            f"{self.url}/v1/{path}",
            headers={"authorization": f"Bearer {self.key}"},
            json=body,
            timeout=60,
        )

    def ray_metric(self, name: str, **labels: str) -> float | None:
        """A sample from Ray's metrics endpoint (vLLM engine metrics arrive as `ray_vllm_*`),
        summed over the series carrying these labels; None while absent."""
        text = httpx.get(f"http://127.0.0.1:{self.up.ray_metrics_port}/metrics", timeout=10).text
        total = None
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="session")
def real_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    workdir = tmp_path_factory.mktemp("real-stack")
    traces = OtlpReceiver()
    up = SluisUp(
        workdir,
        config=REPO / "sluis.yaml",
        env={"SLUIS_OTLP_ENDPOINT": traces.url},
    )
    try:
        up.wait_ready(timeout=900)
    except BaseException:
        up.stop()
        traces.stop()
        raise
    yield RealStack(up, traces)
    # `sluis up` ends on SIGINT with status 0 and leaves no Ray or vLLM process behind.
    code = up.stop()
    traces.stop()
    time.sleep(2)
    survivors = up.survivors()
    assert code == 0, f"sluis up exited with {code}; log: {up.log}"
    assert not survivors, f"processes outlived sluis up: {survivors}"
