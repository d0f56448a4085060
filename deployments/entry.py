"""Import path for deploying with Ray's own tools (`serve run`, `serve deploy`, a KubeRay
RayService): `deployments.entry:app_builder`, with the application argument `config` (the
sluis.yaml path on the cluster). `sluis up --address` does the same from a workstation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployments.app import build_application, check_engine_args
from deployments.sources import resolve_sources
from gateway.settings import load_settings


def app_builder(args: dict[str, Any]) -> Any:
    settings = load_settings(Path(args["config"]) if args.get("config") else None)
    check_engine_args(settings.file.models)
    sources = resolve_sources(settings.file.models, settings.state_dir / "models")
    return build_application(settings, sources)
