"""Locust scenarios modelled on an AI factory's tenants (`make loadtest`, or
`locust -f loadtests/scenarios.py --host URL --sluis-admin-token TOKEN`).

- Startup: bursty streaming chat (a few requests in quick succession, then a pause).
- PublicAgency: steady embeddings and chat, one request a second.
- BatchJob: long streamed completions back to back.
- NoisyNeighbour: far above its quota (20 requests/minute, it tries ~10/s): mostly 429s.

Each scenario is a tenant of its own, created with its key through the admin API when the test
starts. Every request's id, status and the usage the client saw are recorded, and streams are
timed as they arrive (time to first token, time per output token), per tenant:
`requests.jsonl` and `stream_latency.csv` in `--sluis-out`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import gevent
import requests
from locust import HttpUser, between, constant, constant_pacing, events, task
from locust.clients import ResponseContextManager
from locust.env import Environment
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtests.load_records import RequestRecord, Run, StreamTiming, write_run


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--sluis-admin-token", default="", env_var="SLUIS_ADMIN_TOKEN")
    parser.add_argument("--sluis-out", default="loadtest-out", help="where records are written")
    parser.add_argument("--sluis-chat-model", default="tiny-chat")
    parser.add_argument("--sluis-embed-model", default="tiny-embed")
    parser.add_argument("--sluis-run-id", default="", help="suffix of the tenants' names")


@events.test_start.add_listener
def _create_tenants(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    assert options is not None and environment.host, "--host and --sluis-admin-token are needed"
    run_id = options.sluis_run_id or time.strftime("%H%M%S")
    run = Run(run_id=run_id, out=Path(options.sluis_out))
    admin = requests.Session()
    admin.headers["authorization"] = f"Bearer {options.sluis_admin_token}"
    for user_class in SCENARIOS:
        name = f"lt-{user_class.tenant_role}-{run_id}"
        created = admin.post(
            f"{environment.host}/admin/v1/tenants",
            json={"name": name, "models": ["*"], "quotas": user_class.quotas},
            timeout=30,
        )
        if created.status_code != 201:
            raise RuntimeError(f"creating tenant {name}: {created.status_code} {created.text}")
        key = admin.post(
            f"{environment.host}/admin/v1/tenants/{name}/keys", json={"name": "load"}, timeout=30
        ).json()["key"]
        run.tenants[user_class.tenant_role] = (name, key)
    environment.sluis_run = run  # type: ignore[attr-defined]


@events.test_stop.add_listener
def _write_records(environment: Environment, **_: Any) -> None:
    run: Run | None = getattr(environment, "sluis_run", None)
    if run is not None:
        write_run(run)
    # Every user has finished: one more turn of Locust's CSV writer (it rewrites the files each
    # CSV_STATS_INTERVAL_SEC and is not run once more at exit) makes its CSV final.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)


class TenantUser(HttpUser):
    abstract = True
    tenant_role: ClassVar[str] = ""
    quotas: ClassVar[dict[str, Any]] = {}
    expected_statuses: ClassVar[frozenset[int]] = frozenset({200})

    @property
    def load_run(self) -> Run:
        run: Run = self.environment.sluis_run
        return run

    @property
    def options(self) -> Any:
        return self.environment.parsed_options

    def call(self, path: str, body: dict[str, Any], name: str) -> None:
        """One request, as the tenant; streams are read chunk by chunk and timed."""
        _, key = self.load_run.tenants[self.tenant_role]
        started = time.perf_counter()
        with self.client.post(
            f"/v1/{path}",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            name=name,
            stream=bool(body.get("stream")),
            catch_response=True,
            timeout=300,
        ) as response:
            record = RequestRecord(
                tenant=self.tenant_role,
                scenario=name,
                status=response.status_code,
                request_id=response.headers.get("x-request-id", ""),
            )
            try:
                if response.status_code == 200 and body.get("stream"):
                    timing = self._read_stream(response, started, record)
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    response.request_meta["response_time"] = elapsed_ms
                    if timing is not None:
                        self.load_run.timings.append(timing)
                elif response.status_code == 200:
                    usage = response.json().get("usage") or {}
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    record.completion_tokens = int(usage.get("completion_tokens") or 0)
            except (requests.RequestException, ValueError) as exc:  # cut off, or not JSON
                self.load_run.records.append(record)
                response.failure(f"answer broke off: {exc!r}")
                return
            self.load_run.records.append(record)
            _judge(response, expected=self.expected_statuses)

    def _read_stream(
        self, response: ResponseContextManager, started: float, record: RequestRecord
    ) -> StreamTiming | None:
        first: float | None = None
        for line in _lines_as_they_arrive(response):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                if line == b"data: [DONE]":
                    record.complete = True
                continue
            chunk = json.loads(line[6:])
            if first is None and _has_text(chunk):
                first = time.perf_counter()
            usage = chunk.get("usage")
            if usage:
                record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                record.completion_tokens = int(usage.get("completion_tokens") or 0)
        if first is None:
            return None
        ended = time.perf_counter()
        tokens = record.completion_tokens
        tpot = (ended - first) / (tokens - 1) if tokens > 1 else None
        return StreamTiming(self.tenant_role, ttft_s=first - started, tpot_s=tpot)


def _lines_as_they_arrive(response: ResponseContextManager) -> Iterator[bytes]:
    """The stream's lines, each as soon as its bytes are in. (`iter_lines()` reads 512-byte
    blocks first: the first token would be timed when 512 bytes had come, not when it came.)"""
    pending = b""
    for piece in response.iter_content(chunk_size=None):
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content") or choice.get("text"):
            return True
    return False


def _judge(response: ResponseContextManager, *, expected: frozenset[int]) -> None:
    if response.status_code in expected:
        response.success()
    else:
        response.failure(f"status {response.status_code}")


def _chat(model: str, text: str, max_tokens: int, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _bursts(size: int, within: Callable[[], float], pause: Callable[[], float]) -> Any:
    """A wait time: `size` requests `within` of each other, then a `pause`."""

    def wait(user: Any) -> float:
        user.sent = getattr(user, "sent", 0) + 1
        return within() if user.sent % size else pause()

    return wait


class Startup(TenantUser):
    """Bursty streaming chat."""

    tenant_role = "startup"
    quotas: ClassVar[dict[str, Any]] = {"requests_per_minute": 600, "tokens_per_minute": 200_000}
    weight = 3
    wait_time = _bursts(5, lambda: random.uniform(0.05, 0.2), lambda: random.uniform(2, 5))

    @task
    def chat(self) -> None:
        prompt = random.choice(["Pitch our product.", "Summarise this call.", "Write a tagline."])
        self.call(
            "chat/completions",
            _chat(self.options.sluis_chat_model, prompt, 48, stream=True),
            "startup chat stream",
        )


class PublicAgency(TenantUser):
    """Steady embeddings and chat (a municipality's search and assistant)."""

    tenant_role = "agency"
    quotas: ClassVar[dict[str, Any]] = {"requests_per_minute": 300, "eur_per_month": 100}
    weight = 2
    wait_time = constant_pacing(1.0)

    @task(2)
    def embed(self) -> None:
        body = {"model": self.options.sluis_embed_model, "input": ["Aanvraag parkeervergunning"]}
        self.call("embeddings", body, "agency embeddings")

    @task(1)
    def chat(self) -> None:
        body = _chat(
            self.options.sluis_chat_model, "Hoe vraag ik een paspoort aan?", 32, stream=True
        )
        self.call("chat/completions", body, "agency chat stream")


class BatchJob(TenantUser):
    """Long completions back to back (a nightly summarisation job)."""

    tenant_role = "batch"
    quotas: ClassVar[dict[str, Any]] = {"tokens_per_day": 50_000_000}
    fixed_count = 1
    wait_time = constant(0)

    @task
    def complete(self) -> None:
        body = {
            "model": self.options.sluis_chat_model,
            "prompt": "Report of the meeting of the water board:",
            "max_tokens": 256,
            "min_tokens": 256,  # every answer runs to its cap
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.call("completions", body, "batch completion stream")


class NoisyNeighbour(TenantUser):
    """Far above its quota: its 429s are the expected answer, and must not slow the others."""

    tenant_role = "noisy"
    quotas: ClassVar[dict[str, Any]] = {"requests_per_minute": 20}
    fixed_count = 1
    wait_time = between(0.05, 0.15)
    expected_statuses = frozenset({200, 429})

    @task
    def chat(self) -> None:
        body = _chat(self.options.sluis_chat_model, "Again!", 8, stream=False)
        self.call("chat/completions", body, "noisy chat")


SCENARIOS: tuple[type[TenantUser], ...] = (Startup, PublicAgency, BatchJob, NoisyNeighbour)
