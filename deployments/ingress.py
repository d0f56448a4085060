"""The gateway as the Ray Serve ingress deployment, serving HTTP itself.

The replica runs the same Starlette application `sluis gateway` serves (`create_app`) under
uvicorn on the configured host and port, with the catalog's model deployments as its upstream
(DeploymentHandles, `gateway/upstreams/ray_serve.py`). Ray Serve's own HTTP proxy is not in the
path (`sluis up` starts Serve with proxies disabled): on this hardware each Python hop costs the
engine about a quarter of its throughput, and the proxy would also stamp a second
`x-request-id` onto every answer. Serve still owns the replica: placement, health checks,
restarts. The application's lifespan (database, quotas, metering, metrics listener) runs at
replica start and drains when Serve stops the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.serve import gateway_server
from gateway.settings import Settings
from gateway.upstreams.ray_serve import RayServeUpstream


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a replica: signals belong to Ray, not to the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayIngress:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, settings: Settings, models: dict[str, Any]
    ) -> None:
        """`models`: the upstream model name -> its deployment's handle (bound by Serve)."""
        app = create_app(settings, upstream=RayServeUpstream(models))
        self._server = _EmbeddedServer(gateway_server(app, settings).config)
        self._serving = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._serving.done():
                # uvicorn exits (SystemExit) when the port is taken or start-up fails.
                raise RuntimeError(
                    f"the gateway could not serve on {settings.host}:{settings.port}; "
                    "see the replica's log"
                )
            await asyncio.sleep(0.05)

    def check_health(self) -> None:
        if self._serving.done():
            raise RuntimeError("the gateway's HTTP server stopped")

    async def __del__(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(BaseException):
            await self._serving
