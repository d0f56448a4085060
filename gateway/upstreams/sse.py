"""Server-sent events, the little of it OpenAI-style streams use: `data:` lines, blank-line ends.

The upstream decides how large an event is, so one over `MAX_EVENT_BYTES` (data or a line still
unended) is refused as the upstream's failure instead of being buffered. Each byte is copied a
bounded number of times however the stream is split: a buffer compacted once per chunk, and a
search for line ends that never rescans what it has seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.errors import UpstreamFailed

MAX_EVENT_BYTES = 8 * 1024 * 1024


async def iter_sse_data(
    chunks: AsyncIterator[bytes], *, max_event_bytes: int = MAX_EVENT_BYTES
) -> AsyncIterator[bytes]:
    """The `data` of each event in a byte stream, however the bytes were split."""
    buffer = bytearray()
    scanned = 0  # the start of `buffer` known to hold no line end
    data: list[bytes] = []
    size = 0  # the bytes of the event so far
    async for chunk in chunks:
        buffer += chunk
        start = 0
        while (newline := buffer.find(b"\n", scanned)) >= 0:
            line = bytes(buffer[start:newline]).rstrip(b"\r")
            start = scanned = newline + 1
            if not line:
                if data:
                    yield b"\n".join(data)
                    data, size = [], 0
            elif line.startswith(b"data:"):
                value = line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:]
                size += len(value) + 1
                if size > max_event_bytes:
                    raise _too_large(max_event_bytes)
                data.append(value)
        del buffer[:start]
        scanned = len(buffer)
        if size + len(buffer) > max_event_bytes:
            raise _too_large(max_event_bytes)
    if data:
        yield b"\n".join(data)


def encode_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _too_large(limit: int) -> UpstreamFailed:
    return UpstreamFailed(f"The model server sent a stream event over the limit of {limit} bytes.")
