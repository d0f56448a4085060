"""The model catalog: validated once at start-up, every error naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.app import _model_options, check_engine_args
from deployments.sources import resolve_sources
from gateway.settings import ConfigError, FileConfig, ModelConfig, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "sluis.yaml"
    config.write_text(text)
    return config


def test_the_default_catalog_serves_tiny_chat_and_tiny_embed_on_ray() -> None:
    settings = load_settings(REPO / "sluis.yaml")
    assert settings.upstream().kind == "ray"
    tasks = {model.id: (model.task, model.source) for model in settings.file.models}
    assert tasks == {
        "tiny-chat": ("generate", "builtin:tiny-chat"),
        "tiny-embed": ("embed", "builtin:tiny-embed"),
    }
    assert set(settings.file.prices) == {"tiny-chat", "tiny-embed"}  # each model's price entry
    check_engine_args(settings.file.models)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{id: m, replicas: 2, autoscaling: {max_replicas: 3}}", "models.0: Value error, set"),
        (
            "{id: m, autoscaling: {min_replicas: 4, max_replicas: 2}}",
            "models.0.autoscaling: Value error, min_replicas must not exceed max_replicas",
        ),
        ("{id: m, resources: {gpus: -1}}", "models.0.resources.gpus"),
        ("{id: m, placement: {spred: true}}", "models.0.placement.spred"),
        ("{id: m, replicas: 0}", "models.0.replicas"),
    ],
)
def test_a_bad_model_entry_names_its_field(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"upstream: {{kind: ray}}\nmodels: [{model}]\n"))
    assert message in str(caught.value)


def test_a_model_priced_twice_is_refused(tmp_path: Path) -> None:
    text = (
        "models: [{id: m, price: {prompt_eur_per_million: 1, completion_eur_per_million: 1}}]\n"
        "prices: {m: {prompt_eur_per_million: 2, completion_eur_per_million: 2}}\n"
    )
    with pytest.raises(ConfigError, match=r"models.0.price: 'm' is also priced under prices"):
        load_settings(write(tmp_path, text))


def test_engine_arguments_are_checked_against_vllm() -> None:
    typo = ModelConfig(id="m", engine={"max_modle_len": 128})
    with pytest.raises(ConfigError, match=r"^models.0.engine.max_modle_len: not a vLLM engine"):
        check_engine_args([typo])
    reserved = ModelConfig(id="m", engine={"model": "/elsewhere"})
    with pytest.raises(ConfigError, match=r"^models.0.engine.model: set by the catalog"):
        check_engine_args([reserved])
    check_engine_args([ModelConfig(id="m", engine={"max_model_len": 128, "dtype": "float32"})])


def test_sources_resolve_to_checkpoint_folders(tmp_path: Path) -> None:
    models = FileConfig.model_validate(
        {"models": [{"id": "embed", "task": "embed", "source": "builtin:tiny-embed"}]}
    ).models
    (folder,) = resolve_sources(models, tmp_path).values()
    assert (Path(folder) / "config.json").is_file()
    for source, message in [
        (None, "models.0.source: a vLLM model needs a checkpoint folder"),
        ("builtin:huge", "models.0.source: unknown 'builtin:huge'"),
        (str(tmp_path / "nowhere"), "is not a checkpoint folder (no config.json)"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            resolve_sources([ModelConfig(id="m", source=source)], tmp_path)
    assert resolve_sources([ModelConfig(id="m", backend="fake")], tmp_path) == {}


def test_catalog_fields_become_ray_serve_options() -> None:
    spread = ModelConfig.model_validate(
        {
            "id": "eu/chat",
            "replicas": 2,
            "resources": {"cpus": 2, "gpus": 1},
            "placement": {"spread": True, "node_labels": {"region": "eu-west"}},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "4"},
        }
    )
    options = _model_options(spread, tracing=False)
    assert options["name"] == "model-eu_chat"
    assert options["num_replicas"] == 2 and options["max_replicas_per_node"] == 1
    actor = options["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (2, 1)
    assert actor["label_selector"] == {"region": "eu-west"}
    assert actor["runtime_env"]["env_vars"] == {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "4",
    }
    scaled = ModelConfig.model_validate(
        {"id": "m", "autoscaling": {"min_replicas": 0, "max_replicas": 4}}
    )
    options = _model_options(scaled, tracing=True)
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 16.0,
    }
    assert "num_replicas" not in options and "max_replicas_per_node" not in options
    env = options["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
