"""A deterministic fake OpenAI-compatible engine, for fast tests and gateway benchmarks.

Same input, same output: a prompt of N whitespace-separated words is N prompt tokens; the answer
is `max_tokens` words drawn from a fixed list. Like vLLM, a request without `max_tokens` runs on
to the context (unless a default is configured), a cap past the context is lowered to it, `n`
answers each prompt n times and a batch of prompts (`prompt: [..]`) is answered prompt by
prompt, all counted in `usage`. Directives inside the
prompt text steer it, so tests can provoke every path through the real gateway:

    [[fail:503]]        answer with that error status instead
    [[break-after:N]]   stream N tokens, then break the connection (no [DONE])
    [[error-after:N]]   stream N tokens, then an error event (no [DONE]), as vLLM does
    [[delay:S]]         wait S seconds before each token
    [[tokens:N]]        answer with N tokens (still capped by max_tokens)

Usage follows vLLM: streams carry it with `stream_options.include_usage`, on every chunk with
`continuous_usage_stats`.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.upstreams.base import DONE, Endpoint

_DIRECTIVE = re.compile(r"\[\[(fail|break-after|error-after|delay|tokens):([0-9.]+)\]\]")
_WORDS = (
    "sluis",
    "lock",
    "water",
    "gate",
    "canal",
    "barge",
    "river",
    "dike",
    "polder",
    "tide",
    "bridge",
    "harbour",
    "quay",
    "lantern",
    "sail",
    "anchor",
)


class StreamBroken(Exception):
    """The fake stream breaks off, as a crashed model replica would."""


@dataclass(frozen=True)
class FakeEngineConfig:
    models: tuple[str, ...] = ("fake-chat", "fake-embed")
    embedding_models: tuple[str, ...] = ("fake-embed",)
    # None: to the end of the context, as vLLM does without max_tokens.
    default_max_tokens: int | None = None
    max_context: int = 4096
    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    embedding_dim: int = 8


@dataclass
class _Plan:
    endpoint: Endpoint
    model: str
    prompt_tokens: int
    words: list[str]
    token_delay_s: float
    include_usage: bool
    continuous_usage: bool
    # Answers per prompt (n) x prompts: the choices each token step produces.
    choices: int = 1
    break_after: int | None = None
    error_after: int | None = None
    inputs: list[str] = field(default_factory=list)


class FakeEngineError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "error": {
                "message": message,
                "type": "BadRequestError" if status < 500 else "InternalServerError",
                "code": code,
                "param": None,
            }
        }


class FakeEngine:
    def __init__(
        self,
        config: FakeEngineConfig | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config or FakeEngineConfig()
        self._sleep = sleep
        self.running = 0
        self.aborted = 0

    def models(self) -> list[str]:
        return list(self.config.models)

    def plan(self, endpoint: Endpoint, body: dict[str, Any]) -> _Plan:
        """Check a request as a server would; raises `FakeEngineError` when it would refuse."""
        model = body.get("model")
        if model not in self.config.models:
            raise FakeEngineError(404, f"The model `{model}` does not exist.", "model_not_found")
        texts = _texts(endpoint, body)
        prompt = " ".join(texts)
        directives = {name: value for name, value in _DIRECTIVE.findall(prompt)}
        if "fail" in directives:
            status = int(float(directives["fail"]))
            raise FakeEngineError(status, f"Injected failure {status}.")
        prompt_tokens = sum(len(text.split()) for text in texts)
        longest = max((len(text.split()) for text in texts), default=0)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens:
            wanted = int(max_tokens)
        elif self.config.default_max_tokens is not None:
            wanted = self.config.default_max_tokens
        else:
            wanted = max(1, self.config.max_context - longest)
        if "tokens" in directives:
            wanted = min(wanted, int(float(directives["tokens"])))
        if endpoint is not Endpoint.EMBEDDINGS:
            # As vLLM: a prompt that leaves no room is refused; a cap beyond what the context
            # leaves is lowered to it.
            if longest >= self.config.max_context:
                raise FakeEngineError(
                    400,
                    f"This model's maximum context length is {self.config.max_context} tokens. "
                    f"However, your request has {longest} input tokens.",
                )
            wanted = min(wanted, self.config.max_context - longest)
        n = body.get("n") or 1
        prompts = len(texts) if endpoint is Endpoint.COMPLETIONS else 1
        seed = zlib.crc32(prompt.encode())
        words = [_WORDS[(seed + i) % len(_WORDS)] for i in range(wanted)]
        options = body.get("stream_options") or {}
        return _Plan(
            endpoint=endpoint,
            model=model,
            prompt_tokens=prompt_tokens,
            words=words if endpoint is not Endpoint.EMBEDDINGS else [],
            token_delay_s=float(directives.get("delay", self.config.token_delay_s)),
            include_usage=bool(options.get("include_usage")),
            continuous_usage=bool(options.get("continuous_usage_stats")),
            break_after=int(directives["break-after"]) if "break-after" in directives else None,
            error_after=int(directives["error-after"]) if "error-after" in directives else None,
            inputs=texts,
            choices=max(1, int(n)) * max(1, prompts),
        )

    async def complete(self, plan: _Plan) -> dict[str, Any]:
        if plan.endpoint is Endpoint.EMBEDDINGS:
            return self._embeddings(plan)
        if self.config.ttft_s:
            await self._sleep(self.config.ttft_s)
        if plan.token_delay_s:
            await self._sleep(plan.token_delay_s * len(plan.words))
        if plan.break_after is not None or plan.error_after is not None:
            raise FakeEngineError(500, "Injected failure while generating.")
        text = " ".join(plan.words)
        usage = _usage(plan.prompt_tokens, len(plan.words) * plan.choices)
        finish = "length"
        if plan.endpoint is Endpoint.CHAT:
            choices: list[dict[str, Any]] = [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                for index in range(plan.choices)
            ]
            return _envelope("chat.completion", plan.model, choices, usage)
        choices = [
            {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            for index in range(plan.choices)
        ]
        return _envelope("text_completion", plan.model, choices, usage)

    async def stream(self, plan: _Plan) -> AsyncGenerator[bytes, None]:
        self.running += 1
        finished = False
        try:
            chat = plan.endpoint is Endpoint.CHAT
            kind = "chat.completion.chunk" if chat else "text_completion"
            ident = f"fake-{zlib.crc32(' '.join(plan.inputs).encode()):08x}"
            if self.config.ttft_s:
                await self._sleep(self.config.ttft_s)
            if chat:
                yield _chunk(
                    ident,
                    kind,
                    plan.model,
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    },
                    _usage(plan.prompt_tokens, 0) if plan.continuous_usage else None,
                )
            for count, word in enumerate(plan.words, start=1):
                if plan.break_after is not None and count > plan.break_after:
                    raise StreamBroken()
                if plan.error_after is not None and count > plan.error_after:
                    yield orjson.dumps(
                        {
                            "error": {
                                "message": "Injected engine error.",
                                "type": "InternalServerError",
                                "code": 500,
                            }
                        }
                    )
                    finished = True
                    return
                if plan.token_delay_s:
                    await self._sleep(plan.token_delay_s)
                piece = word if count == 1 else " " + word
                last = count == len(plan.words)
                finish = "length" if last else None
                for index in range(plan.choices):
                    choice: dict[str, Any] = (
                        {"index": index, "delta": {"content": piece}, "finish_reason": finish}
                        if chat
                        else {
                            "index": index,
                            "text": piece,
                            "finish_reason": finish,
                            "logprobs": None,
                        }
                    )
                    done = (count - 1) * plan.choices + index + 1
                    usage = _usage(plan.prompt_tokens, done) if plan.continuous_usage else None
                    yield _chunk(ident, kind, plan.model, choice, usage)
            if plan.include_usage:
                yield orjson.dumps(
                    {
                        "id": ident,
                        "object": kind,
                        "created": 0,
                        "model": plan.model,
                        "choices": [],
                        "usage": _usage(plan.prompt_tokens, len(plan.words) * plan.choices),
                    }
                )
            yield DONE
            finished = True
        finally:
            self.running -= 1
            if not finished:
                self.aborted += 1

    def _embeddings(self, plan: _Plan) -> dict[str, Any]:
        data = []
        for index, text in enumerate(plan.inputs):
            seed = zlib.crc32(text.encode())
            vector = [
                ((seed >> (i % 24)) % 1000) / 1000.0 for i in range(self.config.embedding_dim)
            ]
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return {
            "object": "list",
            "model": plan.model,
            "data": data,
            "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
        }


def _texts(endpoint: Endpoint, body: dict[str, Any]) -> list[str]:
    if endpoint is Endpoint.CHAT:
        texts = []
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
        return texts
    value = body.get("prompt") if endpoint is Endpoint.COMPLETIONS else body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _envelope(
    kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": "fake-1",
        "object": kind,
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def _chunk(
    ident: str, kind: str, model: str, choice: dict[str, Any], usage: dict[str, int] | None
) -> bytes:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": kind,
        "created": 0,
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        chunk["usage"] = usage
    return orjson.dumps(chunk)
