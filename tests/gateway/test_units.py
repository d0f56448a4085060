"""Small pure pieces: key format, SSE framing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from gateway.errors import UpstreamFailed
from gateway.keys import display_prefix, generate_key, parse_key, secret_matches
from gateway.upstreams.sse import MAX_EVENT_BYTES, iter_sse_data


def test_generated_keys_parse_and_verify() -> None:
    new = generate_key()
    parsed = parse_key(new.plaintext)
    assert parsed is not None
    assert parsed.public_id == new.public_id
    assert secret_matches(parsed, new.secret_hash)
    assert new.prefix == display_prefix(new.public_id)
    assert new.plaintext.startswith(new.prefix + "-")
    other = generate_key()
    assert not secret_matches(parsed, other.secret_hash)


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "sk-sluis-",
        "sk-other-aaaaaaaaaaaa-" + "a" * 40,
        "sk-sluis-AAAAAAAAAAAA-" + "a" * 40,
        "sk-sluis-aaaaaaaaaaaa-" + "a" * 39,
        "sk-sluis-aaaaaaaaaaaa-" + "a" * 39 + "!",
        "sk-sluis-aaaaaaaaaaaa-" + "a" * 40 + "\n",
    ],
)
def test_malformed_keys_do_not_parse(candidate: str) -> None:
    assert parse_key(candidate) is None


async def _split(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
async def test_sse_data_survives_any_split(size: int) -> None:
    stream = b'data: {"a": 1}\n\n: comment\n\ndata: {"b":\r\ndata: 2}\r\n\r\ndata: [DONE]\n\n'
    events = [event async for event in iter_sse_data(_split(stream, size))]
    assert events == [b'{"a": 1}', b'{"b":\n2}', b"[DONE]"]


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_an_sse_event_over_the_limit_is_an_upstream_failure() -> None:
    consumed = 0

    async def endless_line() -> AsyncIterator[bytes]:  # an upstream that never ends its line
        nonlocal consumed
        yield b'data: {"ok": 1}\n\ndata: '
        while True:
            consumed += 64 * 1024
            yield b"x" * 64 * 1024

    events = []
    with pytest.raises(UpstreamFailed, match="limit"):
        async for event in iter_sse_data(endless_line()):
            events.append(event)
    assert events == [b'{"ok": 1}']
    assert MAX_EVENT_BYTES <= consumed <= MAX_EVENT_BYTES + 64 * 1024


async def test_an_sse_event_of_many_lines_over_the_limit_is_refused() -> None:
    line = b"data: " + b"y" * 1000 + b"\n"
    with pytest.raises(UpstreamFailed, match="limit"):
        [event async for event in iter_sse_data(_chunks(line * 20), max_event_bytes=10_000)]
    under = [
        event async for event in iter_sse_data(_chunks(line * 9 + b"\n"), max_event_bytes=10_000)
    ]
    assert under == [b"\n".join([b"y" * 1000] * 9)]


async def test_sse_parsing_is_linear_in_one_large_chunk() -> None:
    """One chunk of 200,000 small events, and one event arriving in 1,000 small chunks, in well
    under a second (re-copying the rest of the buffer after every line took about 15 s)."""
    many = b'data: {"i": 1}\n\n' * 200_000
    started = time.perf_counter()
    events = [event async for event in iter_sse_data(_chunks(many))]
    assert len(events) == 200_000
    big = b"data: " + b"z" * 4_000_000 + b"\n\n"
    pieces = [big[i : i + 4000] for i in range(0, len(big), 4000)]
    [event] = [event async for event in iter_sse_data(_chunks(*pieces))]
    assert len(event) == 4_000_000
    assert time.perf_counter() - started < 2
