"""The Ray Serve application: one deployment per catalog model, the gateway as the ingress.

`build_application` turns the validated catalog into Serve deployments: replicas or autoscaling
bounds, resources per replica, spread (at most one replica per node) and node labels (a model
with `placement.node_labels` runs only where the nodes carry them: data residency). The checks
that need vLLM or the cluster (`check_engine_args`, `check_placement`) run before deploying, so
a bad catalog fails with the field's name instead of a replica that never starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.settings import ConfigError, ModelConfig, Settings
from gateway.tracing import traces_url

APP_NAME = "sluis"
# No Serve access log line per call: on small machines the logging alone costs the engine CPU,
# and the gateway already records every request (metrics, ledger).
QUIET = {"enable_access_log": False, "log_level": "WARNING"}
GATEWAY_DEPLOYMENT = "gateway"
# vLLM arguments the catalog sets itself (from `source`, `id` and `task`).
RESERVED_ENGINE_ARGS = frozenset({"model", "served_model_name"})


def deployment_name(model: ModelConfig) -> str:
    """A Serve deployment name for the model (Serve reserves `#`)."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model.id)


def build_application(settings: Settings, sources: Mapping[str, str]) -> Any:
    """The bound Serve application; `sources`: model id -> local checkpoint folder."""
    from ray import serve

    from deployments.fake_model import FakeModel
    from deployments.ingress import GatewayIngress
    from deployments.model import VLLMModel

    handles: dict[str, Any] = {}
    for model in settings.file.models:
        served = model.upstream_model or model.id
        options = _model_options(model, tracing=settings.otlp_endpoint is not None)
        if model.backend == "fake":
            deployment = serve.deployment(FakeModel, **options)
            handles[served] = deployment.bind(served, model.task)
        else:
            deployment = serve.deployment(VLLMModel, **options)
            engine = dict(model.engine)
            if settings.otlp_endpoint:
                # vLLM continues the gateway's trace (`traceparent` travels with each call).
                engine.setdefault("otlp_traces_endpoint", traces_url(settings.otlp_endpoint))
            handles[served] = deployment.bind(
                served, sources[model.id], model.task, engine, model.stream_window_ms / 1000
            )
    gateway_actor: dict[str, Any] = {"num_cpus": 0.5}
    if settings.gateway_node_labels:
        gateway_actor["label_selector"] = dict(settings.gateway_node_labels)
    ingress = serve.deployment(
        GatewayIngress,
        name=GATEWAY_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options=gateway_actor,
        # uvicorn's request drain, then the lifespan's own budget (usage written or spooled),
        # then 5 s for the replica to exit: Serve kills it only after all of that.
        graceful_shutdown_timeout_s=settings.shutdown_drain_s + settings.shutdown_flush_s + 5,
        logging_config=QUIET,
    )
    return ingress.bind(settings, handles)


def _model_options(model: ModelConfig, *, tracing: bool) -> dict[str, Any]:
    # Sources are local folders: the model hub is never asked (closed networks hang on it).
    env = {"HF_HUB_OFFLINE": "1", **model.env}
    if tracing:
        env.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")  # as the gateway
        env.setdefault("OTEL_SERVICE_NAME", f"sluis-model-{model.id}")
    actor: dict[str, Any] = {
        "num_cpus": model.resources.cpus,
        "num_gpus": model.resources.gpus,
        "runtime_env": {"env_vars": env},
    }
    if model.placement.node_labels:
        actor["label_selector"] = dict(model.placement.node_labels)
    options: dict[str, Any] = {
        "name": deployment_name(model),
        "ray_actor_options": actor,
        "max_ongoing_requests": model.max_ongoing_requests,
        # vLLM loads in tens of seconds on CPU, minutes for large checkpoints on GPU.
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 10,
        "logging_config": QUIET,
    }
    if model.autoscaling is not None:
        options["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        options["num_replicas"] = model.replicas or 1
    if model.placement.spread:
        options["max_replicas_per_node"] = 1
    return options


def check_engine_args(models: Iterable[ModelConfig]) -> None:
    """Every `engine:` key must be a vLLM engine argument (vLLM would fail deep in a replica)."""
    vllm_models = [(i, m) for i, m in enumerate(models) if m.backend == "vllm"]
    if not vllm_models:
        return
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError as exc:
        raise ConfigError(
            "the catalog has vLLM models but vLLM is not installed "
            "(pip install 'sluis[engine-cpu]' or 'sluis[engine-gpu]')"
        ) from exc
    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    for index, model in vllm_models:
        for key in model.engine:
            if key in RESERVED_ENGINE_ARGS:
                raise ConfigError(f"models.{index}.engine.{key}: set by the catalog, not here")
            if key not in known:
                raise ConfigError(f"models.{index}.engine.{key}: not a vLLM engine argument")


def check_placement(models: Iterable[ModelConfig], nodes: list[dict[str, Any]]) -> None:
    """Each model's node labels must match at least one live node, and spread models need
    as many nodes as replicas; `nodes` as `ray.nodes()` lists them."""
    alive = [node for node in nodes if node.get("Alive")]
    for index, model in enumerate(models):
        wanted = model.placement.node_labels
        matching = [n for n in alive if _carries(n.get("Labels") or {}, wanted)]
        if wanted and not matching:
            present = sorted(
                {
                    f"{k}={v}"
                    for n in alive
                    for k, v in (n.get("Labels") or {}).items()
                    if not k.startswith("ray.io/")
                }
            )
            raise ConfigError(
                f"models.{index}.placement.node_labels: no node carries {_labels(wanted)} "
                f"(node labels in the cluster: {', '.join(present) or 'none'})"
            )
        least = model.autoscaling.min_replicas if model.autoscaling else (model.replicas or 1)
        if model.placement.spread and least > len(matching):
            raise ConfigError(
                f"models.{index}.placement.spread: {least} replicas need {least} nodes, "
                f"the cluster has {len(matching)} that may run it"
            )


def _carries(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
