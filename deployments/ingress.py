"""The gateway as the Ray Serve ingress deployment.

The same Starlette application `sluis gateway` serves (`gateway.app.create_app`), built inside
the replica, with the catalog's model deployments as its upstream (DeploymentHandles, see
`gateway/upstreams/ray_serve.py`). Its lifespan (database, quotas, metering, metrics listener)
runs at replica start-up and drains at replica shutdown, as under uvicorn.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import Settings
from gateway.upstreams.ray_serve import RayServeUpstream


class GatewayIngress:
    def __init__(self, settings: Settings, models: dict[str, Any]) -> None:
        """`models`: the upstream model name -> its deployment's handle (bound by Serve)."""
        self._settings = settings
        self._models = models

    def __serve_build_asgi_app__(self) -> Starlette:
        return create_app(self._settings, upstream=RayServeUpstream(self._models))
