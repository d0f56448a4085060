"""What a request may make the engine do, decided before it is forwarded.

The reservation a tenant's quotas take must cover everything the engine can then produce, so
the gateway holds the engine to it: a request that names no `max_tokens` gets the model's
`max_output_tokens` written into its body (never more than the context leaves after the prompt),
and every sequence the engine will generate (`n`, `best_of`, each prompt of a batch) is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.catalog import Model
from gateway.tokens import count_prompts
from gateway.upstreams.base import Endpoint


@dataclass(frozen=True, slots=True)
class Generation:
    """The most one request can cost: an upper bound of its prompt and completion tokens."""

    prompt_tokens: int
    # The cap on each generated sequence, as the upstream body carries it (0: embeddings).
    max_tokens: int
    # Sequences the engine generates: n (or best_of) x the prompts of a batch.
    sequences: int
    # True when the client named no cap and the gateway chose `max_tokens`.
    defaulted: bool

    @property
    def completion_tokens(self) -> int:
        return self.max_tokens * self.sequences

    def fitting_max_tokens(self, tokens_left: int) -> int:
        """The largest per-sequence cap whose reservation fits `tokens_left` (0: none does)."""
        if self.sequences == 0:
            return 0
        return max(0, min(self.max_tokens, (tokens_left - self.prompt_tokens) // self.sequences))


def plan_generation(endpoint: Endpoint, body: dict[str, Any], model: Model) -> Generation:
    """The request's bound, with the cap it implies written into `body` when it names none."""
    prompts = count_prompts(endpoint, body, model.tokenizer)
    media = model.media_tokens * _media_parts(body) if model.media_tokens else 0
    prompt = sum(prompts) + media
    longest = max(prompts, default=0) + media
    if endpoint is Endpoint.EMBEDDINGS:
        return Generation(prompt, 0, 0, defaulted=False)
    sequences = max(_int(body.get("n")), _int(body.get("best_of"))) * max(1, len(prompts))
    asked = _asked_max_tokens(endpoint, body)
    if asked is None:
        cap = model.max_output_tokens
        if model.context_tokens is not None:
            cap = max(1, min(cap, model.context_tokens - longest))
        _write_cap(endpoint, body, cap)
        return Generation(prompt, cap, sequences, defaulted=True)
    _write_cap(endpoint, body, asked)
    return Generation(prompt, asked, sequences, defaulted=False)


def _asked_max_tokens(endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    if endpoint is Endpoint.CHAT:
        # vLLM's precedence: max_completion_tokens, then max_tokens.
        value = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        value = body.get("max_tokens")
    return value if isinstance(value, int) and value > 0 else None


def _write_cap(endpoint: Endpoint, body: dict[str, Any], cap: int) -> None:
    """Both names carry the one cap: servers that read only `max_tokens` (older SGLang, TGI,
    llama.cpp) are held to it as well as those that prefer `max_completion_tokens`."""
    body["max_tokens"] = cap
    if endpoint is Endpoint.CHAT and "max_completion_tokens" in body:
        body["max_completion_tokens"] = cap


def _media_parts(body: dict[str, Any]) -> int:
    parts = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += sum(
                1 for part in content if isinstance(part, dict) and part.get("type") != "text"
            )
    return parts


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 1
