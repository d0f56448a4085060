"""A stepped, open-loop load sweep of one model through the gateway.

Each step sends requests at a fixed rate with Poisson arrivals for a set time. Latency is
measured from each request's scheduled send time, so a saturated model cannot hide its queue
(no coordinated omission). Chat models get streamed chat completions (TTFT, time per output
token); embedding models get embeddings (TTFT = the whole answer).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtests.capacity import Step, Sweep
from loadtests.httpload import Sample

PROMPT = "Write a short note to the residents about the new opening hours of the lock."


@dataclass(frozen=True)
class SweepSpec:
    url: str  # the gateway, without /v1
    key: str
    model: str
    task: str  # generate | embed
    rates: list[float]
    step_s: float
    max_tokens: int = 64
    seed: int = 7


@dataclass
class _Answer:
    ok: bool
    ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def _generate(session: aiohttp.ClientSession, spec: SweepSpec, due: float) -> _Answer:
    body = {
        "model": spec.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": spec.max_tokens,
        "min_tokens": spec.max_tokens,  # every answer runs to its cap
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first: float | None = None
    usage: dict[str, Any] = {}
    async with session.post(f"{spec.url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return _Answer(ok=False)
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(
                (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()
            ):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    completion = int(usage.get("completion_tokens") or 0)
    if first is None or not usage:
        return _Answer(ok=False)
    tpot = (ended - first) / (completion - 1) if completion > 1 else None
    return _Answer(True, first - due, tpot, int(usage.get("prompt_tokens") or 0), completion)


async def _embed(session: aiohttp.ClientSession, spec: SweepSpec, due: float) -> _Answer:
    body = {"model": spec.model, "input": [PROMPT]}
    async with session.post(f"{spec.url}/v1/embeddings", json=body) as response:
        payload = await response.json(content_type=None)
        if response.status != 200:
            return _Answer(ok=False)
    prompt = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
    return _Answer(True, time.perf_counter() - due, None, prompt, 0)


async def _step(
    session: aiohttp.ClientSession, spec: SweepSpec, rate: float
) -> tuple[list[_Answer], float]:
    """The answers of one step, and the seconds from its first send to its last answer."""
    send = _embed if spec.task == "embed" else _generate
    randomness = random.Random(f"{spec.seed}-{rate}")
    answers: list[_Answer] = []

    async def one(due: float) -> None:
        try:
            answers.append(await send(session, spec, due))
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            answers.append(_Answer(ok=False))

    tasks = []
    start = time.perf_counter()
    due = start
    while due - start < spec.step_s:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(due)))
        due += randomness.expovariate(rate)
    await asyncio.gather(*tasks)
    return answers, time.perf_counter() - start


def _measure(rate: float, answers: list[_Answer], elapsed_s: float, step_s: float) -> Step:
    good = [a for a in answers if a.ok]
    ttfts = [a.ttft_s for a in good if a.ttft_s is not None]
    tpots = [a.tpot_s for a in good if a.tpot_s is not None]
    return Step(
        offered_rps=rate,
        sent_rps=len(answers) / step_s,
        achieved_rps=len(good) / elapsed_s,
        output_tokens_per_s=sum(a.completion_tokens for a in good) / elapsed_s,
        ttft_p95_s=Sample(latencies=ttfts).percentile(95) if ttfts else None,
        tpot_p95_s=Sample(latencies=tpots).percentile(95) if tpots else None,
        requests=len(answers),
        errors=len(answers) - len(good),
    )


async def run_sweep(spec: SweepSpec, replicas: int, *, progress: bool = True) -> Sweep:
    timeout = aiohttp.ClientTimeout(total=max(120.0, spec.step_s * 4))
    headers = {"authorization": f"Bearer {spec.key}"}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=1)
    steps: list[Step] = []
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        for rate in sorted(spec.rates):
            answers, elapsed = await _step(session, spec, rate)
            step = _measure(rate, answers, elapsed, spec.step_s)
            steps.append(step)
            prompt_tokens += [a.prompt_tokens for a in answers if a.ok]
            completion_tokens += [a.completion_tokens for a in answers if a.ok]
            if progress:
                print(f"  {spec.model} @ {rate:g} req/s: {_describe(step)}", flush=True)
    return Sweep(
        model=spec.model,
        task=spec.task,
        replicas=replicas,
        prompt_tokens=_mean(prompt_tokens),
        completion_tokens=_mean(completion_tokens),
        steps=steps,
    )


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _describe(step: Step) -> str:
    ttft = "-" if step.ttft_p95_s is None else f"{step.ttft_p95_s * 1000:.0f} ms"
    tpot = "-" if step.tpot_p95_s is None else f"{step.tpot_p95_s * 1000:.1f} ms"
    return (
        f"answered {step.achieved_rps:.2f} req/s, {step.output_tokens_per_s:.0f} tok/s, "
        f"TTFT p95 {ttft}, TPOT p95 {tpot}, errors {step.errors}"
    )
