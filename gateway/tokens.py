"""Counting a request's prompt tokens before it runs, to reserve quota for it.

The reservation is reconciled with the upstream's own count afterwards, so the estimate only has
to err on the high side: an under-estimate could let a budget overshoot by the difference.

- `whitespace`: words, exactly what the fake engine counts.
- `bytes`: UTF-8 bytes / 3 plus 8 per message for the chat template, above what byte-level BPE
  tokenizers (Llama, Qwen, GPT) produce for ordinary text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from gateway.upstreams.base import Endpoint

TEMPLATE_TOKENS_PER_MESSAGE = 8


def _whitespace(text: str) -> int:
    return len(text.split())


def _bytes(text: str) -> int:
    return math.ceil(len(text.encode()) / 3)


COUNTERS: dict[str, Callable[[str], int]] = {"whitespace": _whitespace, "bytes": _bytes}


def count_prompt_tokens(endpoint: Endpoint, body: dict[str, Any], tokenizer: str) -> int:
    count = COUNTERS[tokenizer]
    total = 0
    for text, is_message in _texts(endpoint, body):
        total += count(text)
        if is_message and tokenizer != "whitespace":
            total += TEMPLATE_TOKENS_PER_MESSAGE
    return total


def _texts(endpoint: Endpoint, body: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    if endpoint is Endpoint.CHAT:
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                yield content, True
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"], True
        return
    value = body.get("prompt") if endpoint is Endpoint.COMPLETIONS else body.get("input")
    items = [value] if isinstance(value, str | int) else value if isinstance(value, list) else []
    for item in items:
        if isinstance(item, str):
            yield item, False
        elif isinstance(item, int):
            yield "x", False  # one token id
        elif isinstance(item, list):
            yield " ".join("x" for _ in item), False  # a list of token ids
