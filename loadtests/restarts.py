"""`sluis up` started and stopped N times in a row, each start timed against a deadline.

    python -m loadtests.restarts --times 10 --ready-timeout 300

Every start uses the repository's `sluis.yaml` in a fresh folder (its own state, ports and
Ray), waits for the announcement, sends one chat request through the gateway, then stops the
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
        key = up.wait_ready(timeout=ready_timeout)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=10)
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    times = []
    with tempfile.TemporaryDirectory(prefix="sluis-restarts-") as tmp:
        for index in range(1, args.times + 1):
            workdir = Path(tmp) / f"start-{index}"
            workdir.mkdir()
            try:
                times.append(one_start(index, workdir, args.ready_timeout))
            except RuntimeError as exc:
                print(f"FAILED {exc}", file=sys.stderr, flush=True)
                logs = sorted(workdir.glob("sluis-up-*.log"))
                for log in logs:
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
