"""`make bench-serving`: tokens/s, TTFT and TPOT of the whole stack against the bare engine.

Two targets, one after the other (never both up at once), on the same tiny-chat checkpoint:

* bare: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`);
* stack: `sluis up` (gateway -> Ray Serve -> vLLM) with a catalog of tiny-chat alone.

Both engines get the same `VLLM_CPU_KVCACHE_SPACE` and `VLLM_CPU_OMP_THREADS_BIND` (vLLM's
default `auto` unless that variable is set here). The same closed-loop load goes to each:
`/v1/completions` of `max_tokens` tokens with `min_tokens` as large (every request yields exactly
that many), streaming and not, at each concurrency; each batch is repeated and medians are reported.
Per request: TTFT (first chunk carrying text; streaming only), latency, output tokens from
`usage`, TPOT = (latency - TTFT) / (tokens - 1), and how many chunks carried text (fewer than
tokens: the server merged outputs, so TPOT shrinks and TTFT grows). Any non-200 answer, transport
error or answer without usage aborts the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml

from deployments.tiny_models import build_tiny_chat
from gateway.serve import run_async as run_loop
from loadtests.httpload import Sample
from loadtests.processes import Process, SluisUp, free_port, process_tree

MODEL = "tiny-chat"
PROMPT = "The gateway sits in front of the model servers. Every request carries an API key, and"
TARGETS = ("bare", "stack")
GOAL_RATIO = 0.95
GOAL_TTFT_DELTA_MS = 15.0
BURST_TPOT_S = 0.0001
BINDING = re.compile(r"(?:core ids|reserved_cpus)=\[[0-9, ]*\]")


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Load:
    requests: int
    concurrency: int
    max_tokens: int
    stream: bool

    @property
    def mode(self) -> str:
        return "stream" if self.stream else "non-stream"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


@dataclass
class Record:
    latency: float
    tokens: int
    ttft: float | None = None
    chunks: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


@dataclass
class Batch:
    """One measured batch: its load, wall time and aggregates (seconds; tokens/s)."""

    mode: str
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    short_requests: int  # fewer output tokens than max_tokens: min_tokens not honoured
    latency_p50_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None
    chunks_p50: float | None  # text-carrying chunks per streamed request
    # Connections the server dropped (seen from bare vLLM when its API server is starved of CPU
    # on 2 cores for seconds): counted and reported, the batch goes on.
    transport_errors: int = 0


@dataclass
class Endpoint:
    base_url: str  # ends in /v1
    headers: dict[str, str] = field(default_factory=dict)
    root_pid: int = 0  # the target's first process; its tree is the target's CPU use


# --- the load generator -------------------------------------------------------------------------


async def one_request(session: aiohttp.ClientSession, endpoint: Endpoint, load: Load) -> Record:
    began = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage: dict[str, Any] | None = None
    async with session.post(
        f"{endpoint.base_url}/completions", json=load.body(), headers=endpoint.headers
    ) as response:
        if response.status != 200:
            text = (await response.text())[:500]
            raise BenchError(f"{endpoint.base_url}: HTTP {response.status}: {text}")
        if load.stream:
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(f"{endpoint.base_url}: error in stream: {chunk['error']}")
                if any(choice.get("text") for choice in chunk.get("choices") or ()):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - began
                usage = chunk.get("usage") or usage
        else:
            usage = (await response.json()).get("usage")
    latency = time.perf_counter() - began
    if not usage or "completion_tokens" not in usage:
        raise BenchError(f"{endpoint.base_url}: answer without usage ({load.mode})")
    if load.stream and ttft is None:
        raise BenchError(f"{endpoint.base_url}: stream without any text")
    return Record(latency, int(usage["completion_tokens"]), ttft, chunks)


async def run_batch(session: aiohttp.ClientSession, endpoint: Endpoint, load: Load) -> Batch:
    """`load.concurrency` workers send back to back until `load.requests` are answered."""
    records: list[Record] = []
    remaining = load.requests
    dropped = 0

    async def worker() -> None:
        nonlocal remaining, dropped
        while remaining > 0:
            remaining -= 1
            try:
                records.append(await one_request(session, endpoint, load))
            except aiohttp.ClientError as exc:
                dropped += 1
                print(f"      {endpoint.base_url}: connection dropped: {exc!r}", flush=True)

    # A collection pause in the load generator would be charged to the server under test.
    gc.disable()
    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    finally:
        wall = time.perf_counter() - began
        gc.enable()
    batch = summarize(load, records, wall)
    batch.transport_errors = dropped
    return batch


def summarize(load: Load, records: list[Record], wall: float) -> Batch:
    def p(values: list[float], q: float) -> float | None:
        return Sample(latencies=values).percentile(q) if values else None

    ttfts = [r.ttft for r in records if r.ttft is not None]
    tpots = [t for r in records if (t := r.tpot) is not None]
    tokens = sum(r.tokens for r in records)
    return Batch(
        mode=load.mode,
        concurrency=load.concurrency,
        requests=len(records),
        wall_s=wall,
        output_tokens=tokens,
        tokens_per_s=tokens / wall,
        short_requests=sum(r.tokens < load.max_tokens for r in records),
        latency_p50_s=Sample(latencies=[r.latency for r in records]).percentile(50),
        ttft_p50_s=p(ttfts, 50),
        ttft_p95_s=p(ttfts, 95),
        tpot_p50_s=p(tpots, 50),
        chunks_p50=statistics.median(r.chunks for r in records) if load.stream else None,
    )


async def measure(endpoint: Endpoint, loads: list[Load], repeats: int, warmup: int) -> list[Batch]:
    """Warm up, then every load `repeats` times (all loads once per round, so drift over the
    run is spread over all of them rather than hitting one)."""
    widest = max(load.concurrency for load in loads)
    # Idle connections are dropped well before the servers' 5 s keep-alive ends: reusing one
    # the server is closing at that moment would fail the request.
    connector = aiohttp.TCPConnector(limit=widest, limit_per_host=widest, keepalive_timeout=1)
    timeout = aiohttp.ClientTimeout(total=900, sock_read=300)
    batches: list[Batch] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for stream in sorted({load.stream for load in loads}):
            sample = next(load for load in loads if load.stream == stream)
            warm = Load(warmup, widest, sample.max_tokens, stream)
            batch = await run_batch(session, endpoint, warm)
            print(f"    warm-up {warm.mode}: {batch.tokens_per_s:,.0f} tokens/s", flush=True)
        for round_ in range(repeats):
            for load in loads:
                batch = await run_batch(session, endpoint, load)
                batches.append(batch)
                print(f"    [{round_ + 1}/{repeats}] {describe(batch)}", flush=True)
    return batches


def describe(batch: Batch) -> str:
    line = (
        f"{batch.mode:>10} c={batch.concurrency:<3} {batch.tokens_per_s:8,.0f} tokens/s"
        f" ({batch.requests} requests in {batch.wall_s:.2f} s)"
    )
    if batch.ttft_p50_s is not None:
        line += f", TTFT p50 {ms(batch.ttft_p50_s)} ms, TPOT p50 {ms(batch.tpot_p50_s, 2)} ms"
        line += f", {batch.chunks_p50:g} chunks"
    if batch.short_requests:
        line += f", {batch.short_requests} SHORT"
    if batch.transport_errors:
        line += f", {batch.transport_errors} DROPPED"
    return line


# --- the targets ----------------------------------------------------------------------------------


def engine_env() -> dict[str, str]:
    """What both engines get alike: KV cache size and how engine threads are bound to cores."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }


def bare_command(model_dir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL,
        "--dtype", "bfloat16", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def wait_models(url: str, alive: Callable[[], bool], log: Path, headers: dict[str, str]) -> None:
    """Until GET {url}/models answers 200 (fails at once if the server exits)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"server exited during start-up; log: {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/models", headers=headers, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise BenchError(f"{url}/models not 200 within 600 s; log: {log}")


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def reap(stopped: list[psutil.Process], name: str) -> list[str]:
    """Wait briefly for processes of a stopped target to go; kill those left, by PID."""
    _, alive = psutil.wait_procs(stopped, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            print(f"  {name}: killing leftover {process.pid} {process.name()}", flush=True)
            process.send_signal(signal.SIGKILL)
    return [str(p.pid) for p in alive]


def binding(log: Path) -> list[str]:
    """How vLLM bound its engine threads, as its log says (`core ids=[0]`, `reserved_cpus=[1]`)."""
    found = BINDING.findall(log.read_text(errors="replace")) if log.exists() else []
    return sorted(set(found))


@contextlib.contextmanager
def bare_target(workdir: Path, model_dir: Path, info: dict[str, Any]) -> Iterator[Endpoint]:
    port = free_port()
    command = bare_command(model_dir, port)
    env = {"HF_HUB_OFFLINE": "1", **engine_env()}
    info.update(command=command, env=env)
    process = Process("vllm", command, env=env, cwd=workdir, log=workdir / "vllm-bare.log")
    children: list[psutil.Process] = []
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_models(url, lambda: process.popen.poll() is None, process.log, {})
        children = process_tree(process.popen.pid)
        yield Endpoint(url, root_pid=process.popen.pid)
    finally:
        children += process_tree(process.popen.pid)
        process.stop()
        info["leftovers"] = reap(children, "bare")
        info["omp_binding"] = binding(process.log)


def stack_config(model_dir: Path, stream_window_ms: float | None = None) -> dict[str, Any]:
    """sluis.yaml's tiny-chat entry alone (no embedding model taking CPU), on our checkpoint."""
    return {
        "upstream": {"kind": "ray", "continuous_usage": True},
        "models": [
            {
                "id": MODEL,
                "task": "generate",
                "source": str(model_dir),
                "max_output_tokens": 512,
                "engine": {"dtype": "bfloat16", "max_model_len": 2048},
                "replicas": 1,
                "resources": {"cpus": 1},
                "env": engine_env(),
                **({} if stream_window_ms is None else {"stream_window_ms": stream_window_ms}),
            }
        ],
    }


@contextlib.contextmanager
def stack_target(workdir: Path, model_dir: Path, info: dict[str, Any]) -> Iterator[Endpoint]:
    config = workdir / "bench-serving.yaml"
    catalog = stack_config(model_dir, info.get("stream_window_ms"))
    config.write_text(yaml.safe_dump(catalog, sort_keys=False))
    state = workdir / "state"
    env = {
        "HF_HUB_OFFLINE": "1",
        "SLUIS_STATE_DIR": str(state),
        "SLUIS_DATABASE_URL": f"sqlite+aiosqlite:///{state}/sluis.db",
        **engine_env(),
    }
    info.update(config=catalog, env=env)
    stack = SluisUp(workdir, config=config, env=env)
    info["log"] = str(stack.log)
    try:
        key = stack.wait_ready(timeout=900)
        headers = {"authorization": f"Bearer {key}"}
        url = f"{stack.url}/v1"
        wait_models(url, lambda: stack.popen.poll() is None, stack.log, headers)
        stack.remember_processes()
        yield Endpoint(url, headers, root_pid=stack.popen.pid)
    finally:
        stack.stop()
        info["omp_binding"] = binding(stack.log)
        info["leftovers"] = stack.survivors()
        if info["leftovers"]:
            reap(processes(int(s.split()[0]) for s in info["leftovers"]), "stack")


TARGET_STARTERS = {"bare": bare_target, "stack": stack_target}


# --- where the CPU goes -------------------------------------------------------------------------


def process_label(process: psutil.Process) -> str:
    """`VLLM::Worker`, `ray::ServeReplica:sluis:gateway`, `raylet`, ...: what a process is."""
    with contextlib.suppress(psutil.Error, IndexError):
        first = process.cmdline()[0]
        if first.startswith(("ray::", "VLLM::")):
            return first.split()[0]
    with contextlib.suppress(psutil.Error):
        return process.name()
    return "?"


def cpu_seconds(root_pid: int) -> dict[int, tuple[str, float]]:
    """Per process of the target's tree and of this load generator: (label, CPU seconds)."""
    found: dict[int, tuple[str, float]] = {}
    for process in [*process_tree(root_pid), *processes([root_pid]), psutil.Process()]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            label = "load generator" if process.pid == os.getpid() else process_label(process)
            found[process.pid] = (label, times.user + times.system)
    return found


def cores_used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float
) -> dict[str, float]:
    """CPU seconds per process label over the measurement, as cores (seconds per second)."""
    used: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        spent = seconds - before.get(pid, (label, 0.0))[1]
        used[label] = used.get(label, 0.0) + spent / wall_s
    return dict(
        sorted(((k, round(v, 3)) for k, v in used.items() if v >= 0.005), key=lambda item: -item[1])
    )


# --- the report -----------------------------------------------------------------------------------


def ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(batches: list[Batch]) -> dict[tuple[str, int], dict[str, float | None]]:
    """(mode, concurrency) -> the median over repeats of each aggregate."""
    groups: dict[tuple[str, int], list[Batch]] = {}
    for batch in batches:
        groups.setdefault((batch.mode, batch.concurrency), []).append(batch)
    metrics = ("tokens_per_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "latency_p50_s")
    return {
        key: {m: median([getattr(b, m) for b in group]) for m in metrics}
        for key, group in groups.items()
    }


def pair(a: float | None, b: float | None, digits: int = 1) -> str:
    return f"{ms(a, digits)} / {ms(b, digits)}"


def report(results: dict[str, list[Batch]]) -> tuple[str, list[dict[str, Any]]]:
    bare = medians(results.get("bare", []))
    stack = medians(results.get("stack", []))
    empty: dict[str, float | None] = {}
    rows: list[dict[str, Any]] = []
    lines = [
        "",
        "| mode | concurrency | bare tokens/s | stack tokens/s | b/a | TTFT p50 ms bare / stack"
        " (delta) | TTFT p95 ms bare / stack | TPOT p50 ms bare / stack |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted({*bare, *stack}, key=lambda k: (k[0] != "stream", k[1])):
        a, b = bare.get(key, empty), stack.get(key, empty)
        a_tps, b_tps = a.get("tokens_per_s"), b.get("tokens_per_s")
        ratio = b_tps / a_tps if a_tps and b_tps is not None else None
        a_ttft, b_ttft = a.get("ttft_p50_s"), b.get("ttft_p50_s")
        delta = b_ttft - a_ttft if a_ttft is not None and b_ttft is not None else None
        rows.append(
            {"mode": key[0], "concurrency": key[1], "bare": a, "stack": b, "ratio": ratio}
            | {"ttft_p50_delta_ms": None if delta is None else delta * 1000}
        )
        lines.append(
            f"| {key[0]} | {key[1]} | {tokens(a_tps)} | {tokens(b_tps)} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {pair(a_ttft, b_ttft)}"
            f"{'' if delta is None else f' ({delta * 1000:+.1f})'} | "
            f"{pair(a.get('ttft_p95_s'), b.get('ttft_p95_s'))} | "
            f"{pair(a.get('tpot_p50_s'), b.get('tpot_p50_s'), 2)} |"
        )
    lines += goals(rows) + bursts(rows)
    return "\n".join(lines), rows


def bursts(rows: list[dict[str, Any]]) -> list[str]:
    """Streams whose text arrived all at once: their TTFT is nearly their whole latency."""
    lines = []
    for row in rows:
        for name in TARGETS:
            tpot = row[name].get("tpot_p50_s")
            if tpot is not None and tpot < BURST_TPOT_S:
                lines.append(
                    f"note: {name}, {row['mode']} at concurrency {row['concurrency']}: TPOT p50 "
                    f"{ms(tpot, 3)} ms, the stream arrived in one burst (TTFT ~ latency)"
                )
    return lines


def tokens(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals: b/a >= 0.95 (here: at every concurrency above 1) and TTFT p50 within
    +15 ms at concurrency 1."""
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None and r["concurrency"] > 1]
    deltas = [
        r["ttft_p50_delta_ms"]
        for r in rows
        if r["ttft_p50_delta_ms"] is not None and r["concurrency"] == 1
    ]
    lines = [""]
    if ratios:
        verdict = "met" if min(ratios) >= GOAL_RATIO else "NOT met"
        worst = min(ratios)
        lines.append(f"goal b/a >= {GOAL_RATIO} (concurrency > 1): worst {worst:.3f}, {verdict}")
    if deltas:
        verdict = "met" if max(deltas) <= GOAL_TTFT_DELTA_MS else "NOT met"
        if any(
            r["concurrency"] == 1 and (r["bare"].get("tpot_p50_s") or 1) < BURST_TPOT_S
            for r in rows
        ):
            verdict += " (but bare streamed in one burst: its TTFT is no fair baseline)"
        lines.append(
            f"goal TTFT p50 delta <= +{GOAL_TTFT_DELTA_MS:.0f} ms (concurrency 1): "
            f"{max(deltas):+.1f} ms, {verdict}"
        )
    return lines


def versions() -> dict[str, str]:
    found = {}
    for dist in ("vllm-cpu", "vllm", "ray", "torch", "aiohttp"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


# --- main -----------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def core_list(text: str) -> list[int]:
    return [-1] if text.strip() == "none" else int_list(text)


def target_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(TARGETS)}")
    return names


def pin_frontends(cores: list[int] | None) -> list[int]:
    """Everything of both targets except vLLM's engine threads on the cores vLLM reserves for
    them (its `auto` binding puts the engine on core 0 and leaves the rest to the frontend): the
    servers inherit this process's affinity, the engine worker rebinds its threads itself. The
    same for both targets; without it, frontends and Ray wander onto the engine's core."""
    if not cores or cores == [-1]:
        return []
    chosen = cores
    os.sched_setaffinity(0, set(chosen))
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256, help="requests per batch")
    parser.add_argument(
        "--requests-at-1", type=int, default=32, help="at most this many per batch at concurrency 1"
    )
    parser.add_argument("--concurrency", type=int_list, default=[1, 32, 64], help="e.g. 1,32,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="medians over this many batches")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up requests (0: 2 x widest)")
    parser.add_argument("--targets", type=target_list, default=list(TARGETS), help="bare,stack")
    parser.add_argument("--modes", default="non-stream,stream", help="stream and/or non-stream")
    parser.add_argument("--workdir", type=Path, help="logs, model and state (default: a new tmp)")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument(
        "--stream-window-ms", type=float, help="the stack's catalog stream_window_ms (default: its)"
    )
    parser.add_argument(
        "--frontend-cores",
        type=core_list,
        default=None,
        help="cores for everything but the engine's threads, e.g. 1 (vLLM's auto binding puts "
        "the engine on core 0); default none: measured here, pinning both targets' frontends "
        "to core 1 cost both about a third of their tokens/s",
    )
    args = parser.parse_args()
    started = time.monotonic()
    frontend = pin_frontends(args.frontend_cores)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="sluis-bench-serving-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    modes = {part.strip() for part in args.modes.split(",")}
    at_1 = min(args.requests, args.requests_at_1)
    loads = [
        Load(at_1 if c == 1 else args.requests, c, args.max_tokens, stream)
        for stream in (False, True)
        if ("stream" if stream else "non-stream") in modes
        for c in args.concurrency
    ]
    if not loads:
        parser.error("--modes: stream and/or non-stream")
    warmup = args.warmup or 2 * max(args.concurrency)
    print(f"bench-serving: {', '.join(args.targets)}; logs in {workdir}", flush=True)

    model_dir = build_tiny_chat(workdir / "models" / MODEL).resolve()
    results: dict[str, list[Batch]] = {}
    targets: dict[str, dict[str, Any]] = {}
    for name in args.targets:
        info: dict[str, Any] = {}
        if args.stream_window_ms is not None:
            info["stream_window_ms"] = args.stream_window_ms
        targets[name] = info
        began = time.monotonic()
        print(f"  {name}: starting", flush=True)
        try:
            with TARGET_STARTERS[name](workdir, model_dir, info) as endpoint:
                info["startup_s"] = round(time.monotonic() - began, 1)
                print(f"  {name}: up in {info['startup_s']} s at {endpoint.base_url}", flush=True)
                before = cpu_seconds(endpoint.root_pid)
                clock = time.monotonic()
                results[name] = run_loop(measure(endpoint, loads, args.repeats, warmup))
                info["cpu_cores_used"] = cores_used(
                    before, cpu_seconds(endpoint.root_pid), time.monotonic() - clock
                )
        except BenchError as exc:
            print(f"bench-serving: {name} failed: {exc}", file=sys.stderr, flush=True)
            return 1
        if name != args.targets[-1]:
            time.sleep(3)  # let the stopped target's CPU settle before the next one starts

    table, rows = report(results)
    print(table)
    print(f"frontends (servers, Ray, load generator) on cores {frontend or 'any'}")
    for name, info in targets.items():
        print(f"{name}: env {info.get('env')}, vLLM threads {info.get('omp_binding')}")
        used = ", ".join(f"{label} {cores:.2f}" for label, cores in info["cpu_cores_used"].items())
        print(f"{name}: cores used while measuring (of {os.cpu_count()}): {used}")
    wall = time.monotonic() - started
    print(f"\nwall time {wall:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {
        "load": {
            "requests": args.requests,
            "requests_at_1": args.requests_at_1,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "warmup": warmup,
            "prompt": PROMPT,
            "endpoint": "/v1/completions",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "versions": versions(),
        },
        "model_dir": str(model_dir),
        "targets": targets,
        "summary": rows,
        "batches": {name: [asdict(b) for b in batches] for name, batches in results.items()},
        "wall_s": round(wall, 1),
    }
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
