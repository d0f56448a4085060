"""The `/metrics` listener: its own socket (default 127.0.0.1:9464), so the tenant API never
serves metrics and a firewall can keep them internal. Port 0 turns it off."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app

from gateway.settings import ConfigError


class _QuietServer(uvicorn.Server):
    """A second server in the process must leave signal handling to the first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsListener:
    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self._host, self._port))
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"SLUIS_METRICS_PORT: {self._host}:{self._port} is already in use "
                f"({exc.strerror}); choose another port, or 0 to turn metrics off"
            ) from exc
        config = uvicorn.Config(
            make_asgi_app(self._registry), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        while not self._server.started and not self._task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
