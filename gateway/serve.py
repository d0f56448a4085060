"""Running servers: the gateway, the demo stack, the fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

from gateway.app import admin_token_path, create_app
from gateway.errors import Conflict
from gateway.fake_engine import FakeEngine, FakeEngineConfig
from gateway.fake_server import create_fake_server
from gateway.http_protocol import guarded_protocol
from gateway.settings import ConfigError, Settings
from gateway.state import GatewayState
from gateway.upstreams.fake import FakeUpstream

DEMO_TENANT = "demo"
T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _Server(uvicorn.Server):
    """uvicorn, but a SIGINT/SIGTERM ends in a graceful shutdown and exit status 0, instead of
    re-raising the signal afterwards (which would print a KeyboardInterrupt trace)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def server_for(
    app: Starlette,
    host: str,
    port: int,
    *,
    drain_s: float = 30.0,
    header_timeout_s: float | None = None,
    body_timeout_s: float | None = None,
    max_connections: int | None = None,
) -> uvicorn.Server:
    """A uvicorn server on the gateway's HTTP protocol; the limits (None: none) are explained
    in `gateway/http_protocol.py`."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=guarded_protocol(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s),
        ws="none",  # nothing here speaks WebSocket: no upgrade for a client to try
        limit_concurrency=max_connections,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(drain_s) or None,
    )
    return _Server(config)


def gateway_server(app: Starlette, settings: Settings) -> uvicorn.Server:
    """The gateway's server, with the drain and client limits its settings give."""
    return server_for(
        app,
        settings.host,
        settings.port,
        drain_s=settings.shutdown_drain_s,
        header_timeout_s=settings.request_header_timeout_s,
        body_timeout_s=settings.request_body_timeout_s,
        max_connections=settings.max_client_connections,
    )


def refuse_taken_port(host: str, port: int) -> None:
    """Fail clearly when something already listens there (never share a port silently)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{host}:{port} is already in use ({exc.strerror})") from exc


async def serve_gateway(settings: Settings) -> None:
    refuse_taken_port(settings.host, settings.port)
    app = create_app(settings)
    print(f"sluis gateway on http://{settings.host}:{settings.port}", flush=True)
    await gateway_server(app, settings).serve()


async def serve_up(settings: Settings) -> None:
    """The stack on this machine. Until Ray Serve deployments land, the engine is the in-process
    fake engine unless the config names an upstream URL."""
    refuse_taken_port(settings.host, settings.port)
    upstream = None
    config = settings.upstream()
    if config.kind == "http" and not config.url:
        upstream = FakeUpstream()
    app = create_app(settings, upstream=upstream)
    server = gateway_server(app, settings)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
        await asyncio.sleep(0.05)
    if server.started:
        state: GatewayState = app.state.sluis
        await _announce(settings, state)
    await serving


async def _announce(settings: Settings, state: GatewayState) -> None:
    try:
        await state.tenants.create_tenant(
            DEMO_TENANT, models=("*",), metadata={"created_by": "sluis up"}, actor="sluis-up"
        )
        _, key = await state.tenants.create_key(DEMO_TENANT, actor="sluis-up", name="demo")
    except Conflict:
        key = None
    print(announcement(settings, "", key, state.catalog.ids()[0]), flush=True)


def announcement(settings: Settings, engine: str, key: str | None, model: str) -> str:
    """What `sluis up` prints once serving: where, the admin token, metrics, a demo key."""
    url = f"http://{settings.host}:{settings.port}"
    lines = [
        f"Sluis is up: {url}/v1{engine}",
        "admin token: $SLUIS_ADMIN_TOKEN"
        if os.environ.get("SLUIS_ADMIN_TOKEN")
        else f"admin token: {admin_token_path(settings)}",
        f"metrics: http://{settings.metrics_host}:{settings.metrics_port}/metrics"
        if settings.metrics_port
        else "metrics: off",
    ]
    if key is None:
        lines.append(f"demo tenant exists; new key: sluis keys create {DEMO_TENANT}")
    else:
        lines.append(f"demo tenant key: {key}")
        lines.append(
            f'try: curl {url}/v1/chat/completions -H "Authorization: Bearer {key}" '
            f"-H 'content-type: application/json' "
            f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
        )
    return "\n".join(lines)


async def serve_fake_engine(host: str, port: int, *, ttft_s: float, token_delay_s: float) -> None:
    engine = FakeEngine(FakeEngineConfig(ttft_s=ttft_s, token_delay_s=token_delay_s))
    print(f"fake engine on http://{host}:{port}/v1", flush=True)
    await server_for(create_fake_server(engine), host, port, drain_s=1).serve()
