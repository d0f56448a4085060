"""`sluis up` started and stopped N times in a row, each start timed against a deadline.

    python -m loadtests.restarts --times 10 --ready-timeout 300

Every start uses the repository's `sluis.yaml` in one folder, as a user's repeated `make run`
does (`--fresh`: a new folder, state and database each time), on new ports and its own Ray; it
waits for the announcement, sends one chat request through the gateway, then stops the
stack with SIGINT as a user's Ctrl-C does and checks that no process of it outlives it. A start
that does not become ready in time, a failed request or a survivor ends the run with exit 1,
naming the log. Prints one line per start and the times to ready (min, median, max).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.processes import SluisUp

REPO = Path(__file__).resolve().parents[1]


def one_start(index: int, workdir: Path, ready_timeout: float) -> float:
    started = time.monotonic()
    up = SluisUp(workdir, config=REPO / "sluis.yaml")
    try:
        key = _wait_up(up, started + ready_timeout)
        ready = time.monotonic() - started
        answer = httpx.post(
            f"{up.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={
                "model": "tiny-chat",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hallo"}],
            },
            timeout=60,
        )
        if answer.status_code != 200:
            raise RuntimeError(f"start {index}: chat answered {answer.status_code}: {up.log}")
    finally:
        status = up.stop()
    survivors = up.survivors()
    if survivors:
        raise RuntimeError(f"start {index}: processes outlived the stack: {survivors}")
    print(f"start {index}: ready in {ready:.1f} s, stopped with status {status}", flush=True)
    return ready


def _wait_up(up: SluisUp, deadline: float) -> str:
    """A demo key once the stack announced itself: the one it printed on a first start, else
    a new one made through the admin API (the demo tenant exists from an earlier start)."""
    while time.monotonic() < deadline:
        log = up.log.read_bytes()
        if b"Sluis is up:" in log:
            found = SluisUp.KEY.search(log)
            if found:
                return found.group(1).decode()
            made = httpx.post(
                f"{up.url}/admin/v1/tenants/demo/keys",
                headers={"authorization": f"Bearer {up.admin_token}"},
                json={},
                timeout=30,
            )
            made.raise_for_status()
            return str(made.json()["key"])
        if up.popen.poll() is not None:
            raise RuntimeError(f"sluis up exited with {up.popen.returncode}: {up.log}")
        time.sleep(0.5)
    raise RuntimeError(f"sluis up not ready in time: {up.log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=10)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--fresh", action="store_true", help="a new folder for every start")
    args = parser.parse_args(argv)
    times = []
    with tempfile.TemporaryDirectory(prefix="sluis-restarts-") as tmp:
        for index in range(1, args.times + 1):
            workdir = Path(tmp) / (f"start-{index}" if args.fresh else "stack")
            workdir.mkdir(exist_ok=True)
            try:
                times.append(one_start(index, workdir, args.ready_timeout))
            except RuntimeError as exc:
                print(f"FAILED {exc}", file=sys.stderr, flush=True)
                logs = sorted(workdir.glob("sluis-up-*.log"), key=lambda p: p.stat().st_mtime)
                for log in logs[-1:]:
                    tail = log.read_text(errors="replace").splitlines()[-40:]
                    print("\n".join(tail), file=sys.stderr)
                return 1
    print(
        f"{len(times)} starts, all ready: min {min(times):.1f} s, "
        f"median {statistics.median(times):.1f} s, max {max(times):.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
