"""Events gathered into fewer messages: nothing lost, reordered or delayed at the start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from deployments.coalesce import gathered


async def burst(count: int, *, every_s: float = 0.0, fail: bool = False) -> AsyncIterator[str]:
    for index in range(count):
        yield f"data: {index}\n\n"
        await asyncio.sleep(every_s)
    if fail:
        raise RuntimeError("engine died")


async def test_events_arrive_whole_in_order_and_in_fewer_messages() -> None:
    chunks = [chunk async for chunk in gathered(burst(40, every_s=0.002), window_s=0.03)]
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(40))
    assert chunks[0] == b"data: 0\n\n"  # the first event is not held back
    assert 2 <= len(chunks) < 40


async def test_without_a_window_every_event_travels_alone_when_they_come_apart() -> None:
    chunks = [chunk async for chunk in gathered(burst(5, every_s=0.01), window_s=0)]
    assert chunks == [f"data: {i}\n\n".encode() for i in range(5)]


async def test_an_error_comes_after_the_events_before_it() -> None:
    received: list[bytes] = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for chunk in gathered(burst(3, fail=True), window_s=0.01):
            received.append(chunk)
    assert b"".join(received) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_closing_early_stops_reading_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                yield "data: x\n\n"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    stream = gathered(endless(), window_s=0.005)
    assert await anext(stream)
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), 1)
