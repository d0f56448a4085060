"""Redis calls are exactly once in effect (`quotas/redis.py`): against the real Redis, behind a
TCP proxy that can stall one connection's answers (Redis has run the command; its answer is
late), as a congested or failing network does. Nothing of the project is faked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from quotas.allowances import AllowanceStore
from quotas.checks import Check
from quotas.redis import RedisStore
from quotas.resp import RespConnection
from quotas.store import StoreFailure
from tests.quotas.test_store_contract import T0, budget, concurrency, window

REDIS_PORT = 6379
ALLOWANCE_ID = b"\r\na-"  # how an allowance's id (`a-...`) starts in a command


class StallingProxy:
    """Forwards TCP to Redis. `stall(marker, s)`: once a command carrying `marker` has gone
    through, the answers on that connection are held back for `s` seconds."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.url = ""
        self._armed: tuple[bytes, float] | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = asyncio.Event()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self.url

    def stall(self, marker: bytes, seconds: float) -> None:
        self._armed = (marker, seconds)
        self._held.clear()

    async def held(self) -> None:
        """Returns once an answer to the marked command is held back (Redis has run it)."""
        async with asyncio.timeout(5):
            await self._held.wait()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", REDIS_PORT)
        self._writers += [client_w, redis_w]
        hold_until = [0.0]
        loop = asyncio.get_running_loop()

        async def requests() -> None:
            while data := await client_r.read(65536):
                if self._armed is not None and self._armed[0] in data:
                    hold_until[0] = loop.time() + self._armed[1]
                    self._armed = None
                redis_w.write(data)
                await redis_w.drain()
            redis_w.close()

        async def answers() -> None:
            while data := await redis_r.read(65536):
                if hold_until[0] > loop.time():
                    self._held.set()
                    await asyncio.sleep(hold_until[0] - loop.time())
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        for pump in (requests(), answers()):
            task = asyncio.create_task(self._quietly(pump))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _quietly(pump: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            await pump


@pytest.fixture
async def proxy() -> AsyncIterator[StallingProxy]:
    the_proxy = StallingProxy()
    await the_proxy.start()
    yield the_proxy
    await the_proxy.aclose()


@pytest.fixture
def proxy_url(proxy: StallingProxy) -> str:
    return proxy.url


async def redis_state(checks: list[Check], now: float) -> list[tuple[int, int]]:
    """(used, reserved) per check, asked over a connection of its own."""
    store = RedisStore("redis://127.0.0.1:6379/0", timeout_s=2.0)
    try:
        return [(s.used, s.reserved) for s in await store.state(checks, now)]
    finally:
        await store.aclose()


async def eventually(checks: list[Check], now: float, expected: list[tuple[int, int]]) -> None:
    """Redis reaches `expected` within a few seconds (compensations run in the background)."""
    for _ in range(100):
        states = await redis_state(checks, now)
        if states == expected:
            break
        await asyncio.sleep(0.05)
    assert states == expected


async def test_a_slow_answer_fails_no_other_call(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    store = RedisStore(proxy_url, timeout_s=0.25)
    rpm = [window(tenant, 100)]
    await store.state(rpm, T0)  # connected, scripts loaded
    proxy.stall(b"slow", 0.4)

    async def later(request_id: str) -> bool:
        await asyncio.sleep(0.2)
        return (await store.admit(rpm, request_id, T0)).allowed

    slow, *others = await asyncio.gather(
        store.admit(rpm, "slow", T0),
        *(later(f"r{i}") for i in range(5)),
        return_exceptions=True,
    )
    assert isinstance(slow, StoreFailure)
    assert others == [True] * 5
    # The slow one ran in Redis; its gateway gave up on it, so it is undone.
    await eventually(rpm, T0, [(5, 0)])
    await store.aclose()


async def test_a_cancelled_admission_is_undone(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    store = RedisStore(proxy_url, timeout_s=2.0)
    checks = [window(tenant, 10), budget(tenant, 100, cost=60), concurrency(tenant, 1)]
    await store.state(checks, T0)
    proxy.stall(b"cancelled", 0.4)
    admission = asyncio.create_task(store.admit(checks, "cancelled", T0))
    await proxy.held()  # Redis has run it
    admission.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admission
    # Its window count, reservation and slot are given back: the next request fits.
    await eventually(checks, T0, [(0, 0), (0, 0), (0, 0)])
    assert (await store.admit(checks, "next", T0 + 1)).allowed
    await store.aclose()


async def test_a_cancelled_allowance_grant_is_undone(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    # With allowances the call in flight may be a grant: a share of the limits, not one request.
    inner = RedisStore(proxy_url, timeout_s=2.0)
    gateway = AllowanceStore(inner, clock=lambda: T0)
    checks = [window(tenant, 1000), budget(tenant, 10**6, cost=60), concurrency(tenant, 100)]
    assert (await gateway.admit(checks, "r1", T0)).allowed  # the store's answer, then a grant
    proxy.stall(ALLOWANCE_ID, 0.4)
    admission = asyncio.create_task(gateway.admit(checks, "r2", T0 + 0.001))
    await proxy.held()
    admission.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admission
    await eventually(checks, T0, [(1, 0), (0, 60), (1, 0)])  # r1's alone
    await gateway.aclose()


async def test_a_settle_retried_after_its_answer_was_lost_counts_once(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    # `double_settle.py`: an allowance's settle runs, its answer comes too late, it is retried.
    inner = RedisStore(proxy_url, timeout_s=0.3)
    gateway = AllowanceStore(inner, clock=lambda: T0)
    checks = [budget(tenant, 10**9, cost=1000)]
    for i in range(40):
        assert (await gateway.admit(checks, f"r{i}", T0 + i * 0.001)).allowed
        await gateway.settle(checks, f"r{i}", [1000], admitted_at=T0, now=T0 + 0.2)
    proxy.stall(ALLOWANCE_ID, 0.6)
    with pytest.raises(StoreFailure):
        await gateway.flush(T0 + 1.5)  # the allowances close and are settled; an answer is late
    await asyncio.sleep(0.7)  # the network is well again
    await gateway.flush(T0 + 2)  # the retry
    assert await redis_state(checks, T0 + 2) == [(40_000, 0)]
    await gateway.aclose()


async def test_an_allowance_settled_at_shutdown_counts_once(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    # `cancel_settle.py`: shutdown cancels the flusher inside a settle that Redis has run; the
    # allowance is settled again by the final flush.
    now = [T0]
    inner = RedisStore(proxy_url, timeout_s=2.0)
    gateway = AllowanceStore(inner, clock=lambda: now[0])
    checks = [budget(tenant, 10**9, cost=1000)]
    for i in range(30):
        assert (await gateway.admit(checks, f"r{i}", T0 + i * 0.001)).allowed
        await gateway.settle(checks, f"r{i}", [1000], admitted_at=T0, now=T0 + 0.1)
    proxy.stall(ALLOWANCE_ID, 0.2)
    now[0] = T0 + 2  # the bucket is over: the flusher (every 0.5 s) settles the allowances
    await proxy.held()
    await gateway.aclose()
    assert await redis_state(checks, T0 + 3) == [(30_000, 0)]


async def test_settles_have_their_own_timeout(
    proxy: StallingProxy, proxy_url: str, tenant: str
) -> None:
    store = RedisStore(proxy_url, timeout_s=0.25, settle_timeout_s=2.0)
    checks = [window(tenant, 1000, cost=600, name="tpm"), budget(tenant, 1000, cost=600)]
    assert (await store.admit(checks, "r1", T0)).allowed
    proxy.stall(b"r1", 0.5)
    await store.settle(checks, "r1", [100, 100], admitted_at=T0, now=T0 + 1)
    assert await redis_state(checks, T0 + 1) == [(100, 0), (100, 0)]
    await asyncio.sleep(0.5)
    proxy.stall(b"r2", 0.5)
    with pytest.raises(StoreFailure):
        await store.admit(checks, "r2", T0 + 1)  # an admission keeps the short one
    await store.aclose()


async def test_gateways_with_skewed_clocks_share_one_window(tenant: str) -> None:
    # M8: gateway B's clock runs 120 s ahead of A's. Each hands the store its own time; the
    # windows, leases and reservations follow Redis's clock all the same.
    a = RedisStore("redis://127.0.0.1:6379/0", timeout_s=2.0, clock=time.time)
    b = RedisStore("redis://127.0.0.1:6379/0", timeout_s=2.0, clock=lambda: time.time() + 120)
    rpm = window(tenant, 10)
    for i in range(10):
        assert (await a.admit([rpm], f"a{i}", time.time())).allowed
    refused = [not (await b.admit([rpm], f"b{i}", time.time() + 120)).allowed for i in range(10)]
    assert refused == [True] * 10
    # A's reservation (a 60 s lease) is not expired by B's clock either.
    held = budget(tenant, 100, cost=60, lease=60)
    assert (await a.admit([held], "budget-a", time.time())).allowed
    assert not (await b.admit([held], "budget-b", time.time() + 120)).allowed
    assert (a.offset_s, b.offset_s) == (0, -120)
    await a.aclose()
    await b.aclose()


async def test_a_connection_that_stops_answering_is_replaced(
    proxy: StallingProxy, proxy_url: str
) -> None:
    # A late answer no longer drops the connection; one that never comes still must.
    connection = RespConnection(proxy_url, timeout_s=0.2, connections=1, dead_after_s=0.3)
    assert await connection.call("PING") == "PONG"
    proxy.stall(b"PING", 60)
    with pytest.raises(TimeoutError):
        await connection.call("PING")
    await asyncio.sleep(0.4)
    assert await connection.call("PING") == "PONG"  # over a new connection
    await connection.aclose()
