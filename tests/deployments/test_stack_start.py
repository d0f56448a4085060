"""`sluis up` either comes up or says why within a bound: a start that cannot finish (here the
gateway replica waits forever on a database that accepts connections and never answers) ends
with exit 1 and the deployments' own account, instead of hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.processes import free_port

pytestmark = pytest.mark.real_stack

CONFIG = """
upstream: {kind: ray}
models:
  - id: fake-chat
    backend: fake
    resources: {cpus: 0.5}
"""


def test_a_start_that_cannot_finish_fails_clearly_within_its_bound(tmp_path: Path) -> None:
    (tmp_path / "sluis.yaml").write_text(CONFIG)
    with socket.socket() as silent:  # accepts (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        database = f"postgresql+asyncpg://sluis@127.0.0.1:{silent.getsockname()[1]}/sluis"
        command = [
            sys.executable, "-m", "gateway.cli", "up", "--config", "sluis.yaml",
            "--port", str(free_port()), "--metrics-port", "0", "--ready-timeout", "20",
        ]  # fmt: skip
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env={**os.environ, "SLUIS_DATABASE_URL": database},
            capture_output=True,
            text=True,
            timeout=240,  # bounded: Ray's start, the 20 s, the shutdown
        )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "sluis up: not ready: the application is DEPLOYING after 20 s" in done.stderr
    assert "gateway:" in done.stderr  # the deployment that is not ready, by name
    assert "Ray's logs:" in done.stderr
