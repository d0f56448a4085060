"""Only fields the gateway governs reach the engine: an allow-list per endpoint.

A field is either forwarded (OpenAI's documented parameters and vLLM's sampling extras, none of
which can make the engine do more than the reservation covers), dropped (OpenAI platform
features with no meaning for a model server, e.g. `store`, `metadata`, `user`), or refused with
a 400 naming it: engine controls a tenant must not set (`priority` and `cache_salt` are the
gateway's to set; `ignore_eos`, a `min_tokens` beyond the cap, server-side templates, engine
hooks) and anything unknown, as OpenAI refuses unknown parameters.

Non-text message parts (images, audio, video, files) are refused for a model that reads text
only; for a multimodal model (`media_tokens` in the catalog) they must be inline `data:` URLs
unless the catalog allows the model server to fetch URLs (`media_urls: true`).
"""

from __future__ import annotations

from typing import Any

from gateway.catalog import Model
from gateway.errors import InvalidRequest
from gateway.upstreams.base import Endpoint

_SAMPLING = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "stop",
        "seed",
        "logprobs",
        "logit_bias",
        "response_format",
        # vLLM's sampling extras
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "allowed_token_ids",
        "bad_words",
        "min_tokens",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_whitespace_pattern",
        "return_tokens_as_token_ids",
    }
)

FORWARDED: dict[Endpoint, frozenset[str]] = {
    Endpoint.CHAT: _SAMPLING
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "reasoning_effort",
        "chat_template_kwargs",  # only the keys below
        "add_generation_prompt",
        "continue_final_message",
        "echo",
    },
    Endpoint.COMPLETIONS: _SAMPLING | {"prompt", "best_of", "echo", "suffix"},
    Endpoint.EMBEDDINGS: frozenset(
        {"model", "input", "encoding_format", "dimensions", "truncate_prompt_tokens"}
    ),
}

# OpenAI platform features that mean nothing to a model server (and `user`, an end-user id a
# tenant may send that the gateway does not pass on).
DROPPED = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "modalities",
    }
)

# Engine controls, refused by name so the error says why.
REFUSED: dict[str, str] = {
    "priority": "the gateway sets scheduling priority",
    "cache_salt": "the gateway sets cache isolation",
    "ignore_eos": "generation past the end of the answer is not offered",
    "chat_template": "the model's own chat template is used",
    "mm_processor_kwargs": "engine processor settings are the operator's",
    "kv_transfer_params": "engine transfer settings are the operator's",
    "vllm_xargs": "engine extension arguments are the operator's",
    "request_id": "the gateway names every request",
    "documents": "retrieval documents are not offered",
    "guided_decoding_backend": "the structured-output backend is the operator's",
}

# `chat_template_kwargs` keys a tenant may set (a reasoning model's thinking switch).
TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking"})

_MEDIA_URL_FIELDS = ("image_url", "audio_url", "video_url", "input_audio", "file")


def govern_fields(endpoint: Endpoint, body: dict[str, Any], model: Model) -> None:
    """Refuse what may not reach the engine, drop what means nothing to it (in place)."""
    allowed = FORWARDED[endpoint]
    for name in list(body):
        if name in allowed:
            continue
        if name in DROPPED:
            del body[name]
        elif name in REFUSED:
            raise InvalidRequest(
                f"The parameter '{name}' cannot be set by clients: {REFUSED[name]}.",
                code="unsupported_parameter",
                param=name,
            )
        else:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: '{name}'.",
                code="unknown_parameter",
                param=name,
            )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        _check_template_kwargs(kwargs)
    if endpoint is Endpoint.CHAT:
        _check_media(body, model)


def check_min_tokens(body: dict[str, Any]) -> None:
    """`min_tokens` may not exceed the cap the request runs with (written by then)."""
    minimum = body.get("min_tokens")
    if minimum is None:
        return
    cap = body.get("max_tokens")
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
        raise InvalidRequest(
            "Invalid value for 'min_tokens': a whole number >= 0.",
            code="invalid_value",
            param="min_tokens",
        )
    if isinstance(cap, int) and minimum > cap:
        raise InvalidRequest(
            f"'min_tokens' ({minimum}) may not exceed max_tokens ({cap}).",
            code="invalid_value",
            param="min_tokens",
        )


def _check_template_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, dict) or not all(
        key in TEMPLATE_KWARGS and isinstance(value, bool) for key, value in kwargs.items()
    ):
        raise InvalidRequest(
            "'chat_template_kwargs' may only carry "
            + ", ".join(sorted(TEMPLATE_KWARGS))
            + " (true or false).",
            code="unsupported_parameter",
            param="chat_template_kwargs",
        )


def _check_media(body: dict[str, Any], model: Model) -> None:
    for index, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") in (None, "text"):
                continue
            param = f"messages.{index}.content"
            if model.media_tokens is None:
                raise InvalidRequest(
                    f"The model '{model.id}' reads text only; '{part.get('type')}' parts "
                    "are not accepted.",
                    code="unsupported_content",
                    param=param,
                )
            if not model.media_urls and _fetches_url(part):
                raise InvalidRequest(
                    f"The model '{model.id}' accepts media inline only (data: URLs).",
                    code="unsupported_content",
                    param=param,
                )


def _fetches_url(part: dict[str, Any]) -> bool:
    for field in _MEDIA_URL_FIELDS:
        value = part.get(field)
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str) and not url.startswith("data:"):
            return True
    return False
