"""Sluis gateways and a Redis server as real processes, for tests across replicas."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from loadtests.processes import free_port, sluis_gateway_command, wait_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


class GatewayProcess:
    def __init__(self, workdir: Path, env: dict[str, str], upstream: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / f"gateway-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            sluis_gateway_command(upstream, self.port),
            cwd=workdir,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        wait_port(self.port, self.process)
        deadline = time.monotonic() + 30
        while httpx.get(f"{self.url}/healthz").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not healthy")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.log.close()
        return self.process.returncode
