"""Typed configuration, validated once at start-up.

Two sources: `SLUIS_*` environment variables (deployment knobs and secrets) and one YAML file
(`sluis.yaml`: upstream and model catalog). A bad value fails start-up with `ConfigError`, naming
the file or variable, the field and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing.prices import DatedPrice, ModelPrice, check_history
from quotas.policy import QuotaPolicy

DEFAULT_CONFIG_FILE = Path("sluis.yaml")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    # http: an OpenAI-compatible server at `url`; ray: the catalog's Ray Serve deployments
    # (deployments/), reached through DeploymentHandles; fake: the built-in fake engine.
    kind: Literal["http", "ray", "fake"] = "http"
    url: str | None = None
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    # Ask the server for usage on every chunk (vLLM's `continuous_usage_stats`) so that a
    # client leaving mid-stream is billed exactly the tokens it was sent.
    continuous_usage: bool = True


class Autoscaling(_Strict):
    """Ray Serve autoscaling bounds for one model: replicas follow ongoing requests."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Resources(_Strict):
    """What one replica of a model reserves on its node."""

    cpus: float = Field(default=1.0, ge=0)
    gpus: float = Field(default=0.0, ge=0)


class Placement(_Strict):
    # At most one replica of this model per node (replicas spread over the cluster).
    spread: bool = False
    # Only nodes carrying all these Ray node labels may run the model (data residency).
    node_labels: dict[str, str] = Field(default_factory=dict)


class ModelConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    task: Literal["generate", "embed"] = "generate"
    upstream_model: str | None = None
    owned_by: str = "sluis"
    # How prompts are counted for quota reservations (see gateway/tokens.py).
    tokenizer: Literal["whitespace", "bytes"] = "bytes"
    # What a request without max_tokens may generate at most: its reservation.
    max_output_tokens: int = Field(default=4096, ge=1)
    # The context window in tokens; unset, `engine.max_model_len` when given. A request without
    # max_tokens is capped at what the context leaves after its prompt.
    context_tokens: int | None = Field(default=None, ge=2)
    # Multimodal input: tokens reserved per image/audio/video part (unset: text only, such
    # parts are refused), and whether parts may be URLs the model server would fetch (SSRF
    # from the model network: off unless the operator opts in; inline `data:` URLs always work).
    media_tokens: int | None = Field(default=None, ge=1)
    media_urls: bool = False
    # The rest describes how `upstream.kind: ray` runs the model (deployments/).
    # vllm: vLLM's engine in a Ray Serve deployment; fake: the deterministic fake engine.
    backend: Literal["vllm", "fake"] = "vllm"
    # A local checkpoint folder, or `builtin:tiny-chat` / `builtin:tiny-embed` (built by
    # `sluis models build-tiny` into the state folder when absent).
    source: str | None = None
    # vLLM engine arguments (AsyncEngineArgs fields), checked against vLLM when deploying.
    engine: dict[str, Any] = Field(default_factory=dict)
    replicas: int | None = Field(default=None, ge=1)
    autoscaling: Autoscaling | None = None
    resources: Resources = Resources()
    placement: Placement = Placement()
    # Requests one replica takes at once before Ray Serve queues them in the caller.
    max_ongoing_requests: int = Field(default=256, ge=1)
    # A replica sends a stream's events to the gateway gathered over this window (the first
    # at once): fewer Ray messages, the same events. 0 sends each event on its own.
    stream_window_ms: float = Field(default=20.0, ge=0, le=1000)
    # Environment of the model's replicas (e.g. VLLM_CPU_KVCACHE_SPACE, the KV cache in GiB).
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_scaling_rule(self) -> ModelConfig:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set either replicas or autoscaling, not both")
        return self

    @model_validator(mode="after")
    def _output_fits_the_context(self) -> ModelConfig:
        context = self.context_window()
        named = "max_output_tokens" in self.model_fields_set  # the default is capped per request
        if (
            named
            and context is not None
            and self.task == "generate"
            and self.max_output_tokens >= context
        ):
            raise ValueError(
                f"max_output_tokens ({self.max_output_tokens}) must be below the context "
                f"window ({context})"
            )
        return self

    def context_window(self) -> int | None:
        """`context_tokens`, else vLLM's `engine.max_model_len`, else unknown."""
        if self.context_tokens is not None:
            return self.context_tokens
        value = self.engine.get("max_model_len")
        return value if isinstance(value, int) and value > 1 else None


class FileConfig(_Strict):
    upstream: UpstreamConfig = UpstreamConfig()
    models: tuple[ModelConfig, ...] = ()
    # Quotas every tenant gets unless its own say otherwise; unset fields are unlimited.
    quotas: QuotaPolicy = QuotaPolicy()
    # Per model: one price, or a history of prices each in force `from` a date.
    prices: dict[str, ModelPrice | list[DatedPrice]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _model_prices_join_the_price_book(cls, raw: Any) -> Any:
        """A model's own `price:` entry is its price-book entry (one place per model)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), list | tuple):
            return raw
        prices = dict(raw.get("prices") or {})
        models = []
        for index, model in enumerate(raw["models"]):
            if isinstance(model, dict) and "price" in model:
                model = dict(model)
                price = model.pop("price")
                model_id = model.get("id")
                if model_id in prices:
                    raise ValueError(
                        f"models.{index}.price: {model_id!r} is also priced under prices:"
                    )
                prices[model_id] = price
            models.append(model)
        return {**raw, "models": models, "prices": prices}

    @field_validator("prices")
    @classmethod
    def _price_histories(
        cls, prices: dict[str, ModelPrice | list[DatedPrice]]
    ) -> dict[str, ModelPrice | list[DatedPrice]]:
        for value in prices.values():
            check_history(value)
        return prices

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        seen: set[str] = set()
        for model in models:
            if model.id in seen:
                raise ValueError(f"model id {model.id!r} is listed twice")
            seen.add(model.id)
        return models


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUIS_", extra="ignore", frozen=True)

    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///./.sluis/sluis.db"
    admin_token: SecretStr | None = None
    upstream_url: str | None = None
    state_dir: Path = Path(".sluis")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    key_cache_ttl_s: float = Field(default=5.0, ge=0)
    meter_batch_size: int = Field(default=200, ge=1)
    meter_linger_s: float = Field(default=0.1, ge=0)
    redis_url: str | None = None
    # Names this gateway in the ledger; stable across restarts (default: host:port).
    gateway_id: str | None = Field(default=None, max_length=128)
    otlp_endpoint: str | None = None
    metrics_host: str = "127.0.0.1"
    # The /metrics listener, apart from the API; 0 turns it off.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    quota_fail_mode: Literal["open", "closed"] | None = None
    quota_timeout_s: float = Field(default=0.25, gt=0)
    # Settles run after the answer has gone out: they may wait longer than an admission.
    quota_settle_timeout_s: float = Field(default=2.0, gt=0)
    # How long a reservation or concurrency slot lives unless renewed: the gateway renews those
    # of its running requests every third of it, so they lapse only once it is gone.
    quota_lease_s: float = Field(default=120.0, gt=0)
    # With Redis: admit most requests from allowances, shares of the limits taken from Redis a
    # bucket (1 s) at a time (`quotas/allowances.py`); off, every admission is a Redis call.
    quota_allowances: bool = True
    shutdown_drain_s: float = Field(default=30.0, ge=0)
    # After the request drain, the one budget of everything else shutdown does: wait for cut
    # streams' records, settle quotas, write usage to the ledger or else the spool, close. The
    # whole stop fits in shutdown_drain_s + shutdown_flush_s (README, "Shutdown").
    shutdown_flush_s: float = Field(default=10.0, ge=1)
    # A stream whose client reads nothing for this long is ended (its slot and the engine
    # freed): a slow reader cannot hold a stream, and its reservation, open for ever.
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    # Slow clients (slowloris): a request's head must arrive within this long of the connection
    # opening (or of its first byte on a kept-alive connection), its body within this long of
    # the head; else 408 and the connection closed. Connections that send nothing close too.
    request_header_timeout_s: float = Field(default=10.0, gt=0)
    request_body_timeout_s: float = Field(default=30.0, gt=0)
    # Connections open, or requests running, at once; requests over it get a 503 at once. Keep
    # it under the process's open-file limit (each request also holds an upstream connection).
    max_client_connections: int = Field(default=2048, ge=1)
    # Ray nodes the gateway replica may run on (e.g. the head node a load balancer points at),
    # as JSON: SLUIS_GATEWAY_NODE_LABELS='{"sluis.eu/role": "gateway"}'.
    gateway_node_labels: dict[str, str] = Field(default_factory=dict)
    file: FileConfig = FileConfig()

    @field_validator("admin_token")
    @classmethod
    def _admin_token_is_not_a_tenant_key(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        value = token.get_secret_value()
        if value.startswith("sk-sluis-"):
            raise ValueError("must not look like a tenant key (sk-sluis-...)")
        if len(value) < 16:
            raise ValueError("must be at least 16 characters")
        return token

    def upstream(self) -> UpstreamConfig:
        """The upstream to use: the file's, with `SLUIS_UPSTREAM_URL` / `--upstream` winning."""
        if self.upstream_url is None:
            return self.file.upstream
        return self.file.upstream.model_copy(update={"kind": "http", "url": self.upstream_url})


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Environment, then the YAML file, then explicit overrides (CLI flags), validated once."""
    try:
        env_only = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe("environment (SLUIS_*)", exc)) from exc
    path = config or env_only.config
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is None:
        return env_only
    file_config = read_config_file(path)
    return env_only.model_copy(update={"config": path, "file": file_config})


def read_config_file(path: Path) -> FileConfig:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(str(path), exc)) from exc


def _describe(source: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{field}: {error['msg']}")
    return f"{source}: " + "; ".join(problems)
