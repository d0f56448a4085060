"""The models this gateway serves: ids clients use, mapped to what the upstream calls them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from gateway.errors import NotFound

Task = Literal["generate", "embed"]


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    task: Task
    upstream_model: str
    owned_by: str = "sluis"
    tokenizer: str = "bytes"
    max_output_tokens: int = 4096
    # The model's context window (vLLM's max_model_len), when known: a default cap never asks
    # for more than it leaves after the prompt.
    context_tokens: int | None = None
    # Tokens reserved per image/audio/video part; None: the model reads text only.
    media_tokens: int | None = None
    # Whether media parts may be URLs the model server fetches (else only inline `data:` URLs).
    media_urls: bool = False


class ModelCatalog:
    def __init__(self, models: Iterable[Model]) -> None:
        self._models = {model.id: model for model in models}

    def __iter__(self) -> Iterator[Model]:
        return iter(self._models.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def ids(self) -> list[str]:
        return list(self._models)

    def resolve(self, model_id: str) -> Model:
        model = self._models.get(model_id)
        if model is None:
            raise NotFound(
                f"The model '{model_id}' does not exist.", code="model_not_found", param="model"
            )
        return model
