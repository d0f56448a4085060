"""The parts of OpenAI request bodies the gateway reads, validated strictly.

Everything else in the body passes through untouched (`extra="allow"`): the model server is the
authority on sampling parameters. What the gateway acts on (model, streaming, token limits, the
prompt it meters) must have the right type, or the client gets a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest
from gateway.upstreams.base import Endpoint


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Lenient):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class Message(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Common(_Lenient):
    model: str = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)


class EmbeddingRequest(_Common):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None


Payload = ChatRequest | CompletionRequest | EmbeddingRequest

_SCHEMAS: dict[Endpoint, type[ChatRequest] | type[CompletionRequest] | type[EmbeddingRequest]] = {
    Endpoint.CHAT: ChatRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
}


def validate_payload(endpoint: Endpoint, body: dict[str, Any]) -> Payload:
    try:
        payload = _SCHEMAS[endpoint].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function"))
        if first["type"] == "missing":
            message = f"Missing required parameter: '{field}'."
        else:
            message = f"Invalid value for '{field}': {first['msg']}."
        raise InvalidRequest(
            message,
            code="invalid_value" if first["type"] != "missing" else "missing_required_parameter",
            param=field,
        ) from exc
    if endpoint is Endpoint.EMBEDDINGS and payload.stream:
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream")
    return payload
