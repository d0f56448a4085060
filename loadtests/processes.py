"""Starting benchmark servers as separate processes pinned to cores, and stopping them by PID."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(
    port: int, process: subprocess.Popen[bytes], *, timeout: float = 60, name: str = "process"
) -> None:
    """Until something listens on the loopback port; fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout}s")


def process_tree(pid: int) -> list[psutil.Process]:
    """Every descendant of a process (none once it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def pinned(command: Sequence[str], cores: str) -> list[str]:
    if shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
        return ["taskset", "-c", cores, *command]
    return list(command)


class Process:
    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        log: Path,
    ) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            list(command),
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_port(self, port: int, timeout: float = 120) -> None:
        wait_port(port, self.popen, timeout=timeout, name=f"{self.name} (log: {self.log})")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._out.close()


def sluis_gateway_command(upstream: str, port: int) -> list[str]:
    args = f"-m gateway.cli gateway --upstream {upstream} --port {port}"
    return [sys.executable, *args.split()]


class SluisUp:
    """`sluis up` (Ray Serve + vLLM, or whatever the config says) as a process: waits for its
    announcement, knows every process of its tree, stops it by signal like a user's Ctrl-C."""

    KEY = re.compile(rb"demo tenant key: (sk-sluis-[A-Za-z0-9-]+)")

    def __init__(
        self,
        workdir: Path,
        *,
        config: Path,
        port: int | None = None,
        metrics_port: int | None = None,
        ray_metrics_port: int | None = None,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.ray_metrics_port = ray_metrics_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"sluis-up-{self.port}.log"
        command = [
            sys.executable, "-m", "gateway.cli", "up", "--config", str(config),
            "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--ray-metrics-port", str(self.ray_metrics_port), *extra_args,
        ]  # fmt: skip
        self._out = self.log.open("wb")
        self.popen = subprocess.Popen(
            command,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.key = ""
        self.seen: dict[int, float] = {}

    @property
    def admin_token(self) -> str:
        return (self.workdir / ".sluis" / "admin_token").read_text().strip()

    def wait_ready(self, timeout: float = 600) -> str:
        """The demo tenant key, once the stack has announced itself."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.KEY.search(self.log.read_bytes())
            if found:
                self.key = found.group(1).decode()
                self.remember_processes()
                return self.key
            if self.popen.poll() is not None:
                raise RuntimeError(f"sluis up exited with {self.popen.returncode}: {self.log}")
            time.sleep(0.5)
        raise RuntimeError(f"sluis up not ready within {timeout}s: {self.log}")

    def processes(self) -> list[psutil.Process]:
        return process_tree(self.popen.pid)

    def remember_processes(self) -> None:
        """Note every process of the tree now (pid -> start time), to check none outlives us."""
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                self.seen[process.pid] = process.create_time()

    def survivors(self) -> list[str]:
        alive = []
        for pid, started in self.seen.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {process.name()}")
        return alive

    def stop(self, sig: int = signal.SIGINT, timeout: float = 120) -> int:
        """Signal `sluis up` itself (not its group: as a terminal's Ctrl-C reaches the
        foreground process) and wait; kills the whole group if it hangs."""
        self.remember_processes()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._out.close()
        return self.popen.returncode
