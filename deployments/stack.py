"""`sluis up` on Ray: the whole stack, on a local Ray or deployed onto an existing cluster.

Builds the tiny models when the catalog asks for them, starts (or joins) Ray, deploys the
application (`deployments/app.py`), announces the admin token and a demo tenant key, and on
SIGINT/SIGTERM takes everything down again: the application, Serve, and a Ray it started itself,
so no Ray or vLLM process outlives it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.app import APP_NAME, build_application, check_engine_args, check_placement
from deployments.sources import resolve_sources
from gateway.admin_client import AdminClient, AdminError
from gateway.app import resolve_admin_token
from gateway.serve import DEMO_TENANT, announcement, refuse_taken_port
from gateway.settings import Settings

log = logging.getLogger("sluis.stack")

# Logical CPUs a local Ray declares: scheduling slots, not cores. Serve's controller, proxy and
# ingress need slots beside the model replicas; on 2 real cores the OS shares them anyway.
LOCAL_RAY_CPUS = 8
# Ray Serve's lean request path (its "throughput optimized" set, without direct ingress: our
# gateway serves HTTP itself): handle calls over gRPC instead of Ray actor tasks, user code and
# router on the replica's own event loop, buffered request logs. Read by every Serve process at
# import, so they must be in the environment of the raylets: set here for a local Ray; set them
# on every node of a cluster (README).
SERVE_TUNING = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


@dataclass(frozen=True)
class StackOptions:
    # A Ray cluster to deploy onto (`ray://host:10001` or `host:6379`); None: `RAY_ADDRESS`,
    # else a local Ray started here and stopped on exit.
    address: str | None = None
    ray_metrics_port: int | None = None
    # How long the application may take to become ready (models loaded, gateway serving)
    # before `sluis up` gives up with the deployments' own account of what is missing.
    ready_timeout_s: float = 600.0


class StackNotReady(RuntimeError):
    """The application did not become ready in time, or failed to deploy."""


def run_stack(settings: Settings, options: StackOptions) -> int:
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Before Ray Serve is imported: its constants (and the handles we bind) read them then.
        for name, value in SERVE_TUNING.items():
            os.environ.setdefault(name, value)  # inherited by the raylet and its workers
    import ray
    from ray import serve

    settings = _pinned(settings)
    models = settings.file.models
    check_engine_args(models)
    sources = resolve_sources(models, settings.state_dir / "models")
    if address is None:
        refuse_taken_port(settings.host, settings.port)
    stop = _stop_on_signals()
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:
        init["num_cpus"] = LOCAL_RAY_CPUS
        if options.ray_metrics_port:
            init["_metrics_export_port"] = options.ray_metrics_port
    ray.init(address=address, **init)
    try:
        check_placement(models, ray.nodes())
        # The gateway replica serves HTTP itself (deployments/ingress.py): no Serve proxy.
        serve.start(proxy_location="Disabled")
        serve._run(
            build_application(settings, sources),
            name=APP_NAME,
            route_prefix=None,
            _blocking=False,
        )
        if not _wait_running(options.ready_timeout_s, stop):
            print("sluis: interrupted while starting; shutting down", flush=True)
            return 130
        print(_announce(settings), flush=True)
        stop.wait()
        print("sluis: shutting down", flush=True)
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _wait_running(timeout_s: float, stop: threading.Event) -> bool:
    """Until the application runs (True), or a signal asks to stop (False); raises
    `StackNotReady` when it failed or is not running within `timeout_s`, with every
    deployment's status: a start that cannot finish fails instead of hanging."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        application = serve.status().applications.get(APP_NAME)
        status = application.status if application else ApplicationStatus.NOT_STARTED
        if status == ApplicationStatus.RUNNING:
            return True
        failed = status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)
        if failed or time.monotonic() > deadline:
            lines = [f"the application is {status.value} after {timeout_s:.0f} s"]
            if application is not None:
                if application.message:
                    lines.append(application.message.strip())
                for name, deployment in application.deployments.items():
                    detail = f" ({deployment.message.strip()})" if deployment.message else ""
                    lines.append(f"  {name}: {deployment.status.value}{detail}")
            lines.append("Ray's logs: /tmp/ray/session_latest/logs (serve/ holds the replicas')")
            raise StackNotReady("\n".join(lines))
        if stop.wait(1.0):
            return False


def _pinned(settings: Settings) -> Settings:
    """Settings a replica can use anywhere: absolute paths (replicas do not share our working
    directory) and the admin token resolved once here (the replica and we must agree)."""
    state_dir = settings.state_dir.resolve()
    update: dict[str, Any] = {"state_dir": state_dir}
    sqlite = "sqlite+aiosqlite:///"
    if settings.database_url.startswith(sqlite) and not settings.database_url.startswith(
        sqlite + "/"
    ):
        relative = settings.database_url.removeprefix(sqlite)
        update["database_url"] = sqlite + str(Path(relative).resolve())
    pinned = settings.model_copy(update=update)
    if settings.admin_token is None:
        from pydantic import SecretStr

        pinned = pinned.model_copy(update={"admin_token": SecretStr(resolve_admin_token(pinned))})
    return pinned


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop


def _announce(settings: Settings) -> str:
    """The demo tenant and key made through the admin API (the gateway runs in a replica)."""
    url = f"http://{settings.host}:{settings.port}"
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    admin = AdminClient(url, token)
    key: str | None = None
    try:
        admin.call("POST", "/tenants", json={"name": DEMO_TENANT, "models": ["*"]})
        key = admin.call("POST", f"/tenants/{DEMO_TENANT}/keys", json={"name": "demo"})["key"]
    except AdminError as exc:
        if not str(exc).startswith("409"):
            raise
    finally:
        admin.close()
    models = [m.id for m in settings.file.models]
    engine = f" (Ray Serve; models: {', '.join(models)})"
    return announcement(settings, engine, key, models[0] if models else "MODEL")
