"""Counting what the engine will read before it runs, to reserve quota for it.

The reservation is reconciled with the upstream's own count afterwards, so the estimate must err
on the high side only: an under-estimate would let a budget overshoot by the difference. It
therefore counts everything a chat template renders or the engine reads: message text and
names, assistant tool calls and their arguments, tool results, the `tools` and `functions`
schemas, `response_format` and structured-output schemas, a completion's `suffix`. Token-id
lists count one token per id, exactly.

- `whitespace`: words, exactly what the fake engine counts.
- `bytes`: one token per UTF-8 byte plus a template allowance per message. Byte-level BPE
  (Llama, Qwen, GPT) and WordPiece never produce more tokens than bytes, so this is an upper
  bound for any text, adversarial or not (ordinary English is about four bytes per token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson

from gateway.upstreams.base import Endpoint

# Role markers and separators a chat template wraps around each message (ChatML: 5).
TEMPLATE_TOKENS_PER_MESSAGE = 8
# The generation prompt, BOS and a tools preamble a template may add once per request.
TEMPLATE_TOKENS_PER_REQUEST = 16

# Request fields whose JSON a chat template or the structured-output engine reads.
_SCHEMA_FIELDS = ("tools", "functions", "response_format", "guided_json", "structured_outputs")


def _whitespace(text: str) -> int:
    return len(text.split())


def _bytes(text: str) -> int:
    return len(text.encode())


COUNTERS: dict[str, Callable[[str], int]] = {"whitespace": _whitespace, "bytes": _bytes}


def count_prompt_tokens(endpoint: Endpoint, body: dict[str, Any], tokenizer: str) -> int:
    """An upper bound of the prompt tokens of the whole request (every prompt of a batch)."""
    return sum(count_prompts(endpoint, body, tokenizer))


def count_prompts(endpoint: Endpoint, body: dict[str, Any], tokenizer: str) -> list[int]:
    """An upper bound per prompt: one entry for chat, one per prompt of a batch otherwise."""
    count = COUNTERS[tokenizer]
    templated = tokenizer != "whitespace"
    if endpoint is Endpoint.CHAT:
        total = sum(count(text) for text in _chat_texts(body))
        if templated:
            messages = body.get("messages") or []
            total += TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + TEMPLATE_TOKENS_PER_REQUEST
        return [total]
    value = body.get("prompt") if endpoint is Endpoint.COMPLETIONS else body.get("input")
    extra = 0
    if endpoint is Endpoint.COMPLETIONS:
        suffix = body.get("suffix")
        extra = count(suffix) if isinstance(suffix, str) else 0
        extra += sum(count(text) for text in _schema_texts(body))
    if isinstance(value, str):
        return [count(value) + extra]
    if not isinstance(value, list) or not value:
        return [extra]
    if all(isinstance(item, int) for item in value):
        return [len(value) + extra]  # one prompt of token ids
    counts = []
    for item in value:
        if isinstance(item, str):
            counts.append(count(item) + extra)
        elif isinstance(item, list):
            counts.append(len(item) + extra)  # token ids: exact
        else:
            counts.append(1 + extra)
    return counts


def _chat_texts(body: dict[str, Any]) -> Iterator[str]:
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        for field in ("content", "reasoning_content", "reasoning"):
            yield from _content_texts(message.get(field))
        for field in ("name", "tool_call_id"):
            if isinstance(message.get(field), str):
                yield message[field]
        for field in ("tool_calls", "function_call"):
            if message.get(field):
                yield _json(message[field])
    yield from _schema_texts(body)


def _content_texts(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    yield text
                elif part.get("type") not in (None, "text"):
                    # A non-text part the catalog allows (payloads.py refuses the others): its
                    # own JSON bounds what a URL or inline data costs a text-only reading; the
                    # model's media allowance is added by the reservation.
                    yield _json(part)


def _schema_texts(body: dict[str, Any]) -> Iterator[str]:
    for field in _SCHEMA_FIELDS:
        if body.get(field):
            yield _json(body[field])


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)
