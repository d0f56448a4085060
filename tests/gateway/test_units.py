"""Small pure pieces: key format, SSE framing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.keys import display_prefix, generate_key, parse_key, secret_matches
from gateway.upstreams.sse import iter_sse_data


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
