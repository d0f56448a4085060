"""Fewer, fuller Ray messages: a stream's events gathered over a short window.

Each item a replica yields through a DeploymentHandle is one Ray message, with a fixed cost in
both processes; one message per token costs the engine its CPU on small machines. The events
themselves are untouched (the client gets exactly vLLM's events, one per token); only their
transport is grouped: the first event leaves at once (time to first token is not delayed), later
ones leave together once per window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


async def gathered(events: AsyncIterator[str], window_s: float) -> AsyncIterator[bytes]:
    """`events` as byte chunks, each holding what arrived during one window (0: no waiting).
    Closing this generator cancels the reading of `events`; their error is raised after the
    events that came before it."""
    buffer: list[str] = []
    arrived = asyncio.Event()
    finished = False
    failure: Exception | None = None

    async def pump() -> None:
        nonlocal finished, failure
        try:
            async for event in events:
                buffer.append(event)
                arrived.set()
        except Exception as exc:
            failure = exc
        finally:
            finished = True
            arrived.set()

    reader = asyncio.create_task(pump())
    first = True
    try:
        while True:
            await arrived.wait()
            if window_s and not first and not finished:
                await asyncio.sleep(window_s)
            arrived.clear()
            if buffer:
                chunk = "".join(buffer).encode()
                buffer.clear()
                first = False
                yield chunk
            if finished and not buffer:
                if failure is not None:
                    raise failure
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
