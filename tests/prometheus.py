"""A real Prometheus server (Debian's), started by a test on a free port with its own data."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.processes import free_port


class PrometheusServer:
    def __init__(
        self,
        workdir: Path,
        targets: list[str] | None = None,
        *,
        scrape_s: float = 1.0,
        config: dict[str, Any] | None = None,
    ) -> None:
        """Scrapes `targets` as job `sluis`, or runs a whole `config` (as prometheus.yml)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        if config is None:
            config = {
                "global": {"scrape_interval": f"{round(scrape_s * 1000)}ms"},
                "scrape_configs": [
                    {"job_name": "sluis", "static_configs": [{"targets": targets or []}]}
                ],
            }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self._log = (workdir / "prometheus.log").open("wb")
        self._command = [
            "prometheus",
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self._command, stdout=self._log, stderr=subprocess.STDOUT)

    def pause(self) -> None:
        """Stop the server, keeping its data: a scrape gap until `resume`."""
        self.process.terminate()
        self.process.wait(30)

    def resume(self) -> None:
        self.process = self._start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited"
            try:
                if httpx.get(f"{self.url}/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus not ready")

    def query(self, expression: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression})
        if response.status_code == 400:
            raise ValueError(f"{expression}: {response.json().get('error')}")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self._log.close()
