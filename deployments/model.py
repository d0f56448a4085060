"""One catalog model as a Ray Serve deployment holding vLLM's `AsyncLLM` in its own process.

The replica answers in vLLM's own wire format: it runs vLLM's OpenAI serving classes (chat,
completions, embeddings; the same objects vLLM's API server builds) on the request dict the
gateway sends, so usage, chat templates, validation and error statuses are vLLM's, byte for
byte. Why not `ray.serve.llm`'s `LLMServer`: see the README (measured, `make bench-serving`).

Wire format (read by `gateway/upstreams/ray_serve.py`):
- `respond(endpoint, body, headers)` -> `(status, body bytes)`;
- `stream(endpoint, body, headers)` yields the status, then server-sent-event bytes.

A stream closed early (client gone, gateway cancelled) aborts the request in the engine
deterministically, not when the garbage collector gets to it.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from deployments.coalesce import gathered
from deployments.vllm_errors import error_reply, invalid_body

log = logging.getLogger("sluis.model")

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


class VLLMModel:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        served_name: str,
        source: str,
        task: str,
        engine_args: dict[str, Any],
        stream_window_s: float = 0.0,
    ) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor import Executor
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        arguments = {"runner": "pooling" if task == "embed" else "generate", **engine_args}
        args = AsyncEngineArgs(model=source, served_model_name=[served_name], **arguments)
        config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        log_stats = not args.disable_log_stats
        # Engine metrics leave through Ray's metrics agent (`ray_vllm_*`, per replica), the one
        # endpoint per node that Prometheus scrapes; in-process registries are not reachable.
        self._engine = AsyncLLM(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_requests=False,
            log_stats=log_stats,
            stat_loggers=[RayPrometheusStatLogger] if log_stats else None,
        )
        state = State()
        namespace = argparse.Namespace(**(vars(FrontendArgs()) | vars(args)))
        await init_app_state(
            self._engine,
            state=state,
            args=namespace,
            supported_tasks=await self._engine.get_supported_tasks(),
        )
        self._request_types = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}
        self._embedding_request = TypeAdapter(EmbeddingRequest)
        self._error_response = ErrorResponse
        self._served_name = served_name
        self._stream_window_s = stream_window_s
        self._chat = getattr(state, "openai_serving_chat", None)
        self._completion = getattr(state, "openai_serving_completion", None)
        self._embedding = getattr(state, "serving_embedding", None)

    async def respond(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if endpoint == EMBEDDINGS:
            return await self._embed(body, headers)
        answer = await self._generate(endpoint, body, headers)
        if isinstance(answer, tuple):
            return answer
        # A stream asked for through `respond`: cannot happen from the gateway, which streams
        # through `stream`; refuse rather than buffer.
        await answer.aclose()
        return await invalid_body("stream must be false on this call")

    async def stream(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncIterator[int | bytes]:
        rid = uuid.uuid4().hex
        answer = await self._generate(endpoint, body, {**headers, "x-request-id": rid})
        if isinstance(answer, tuple):
            yield answer[0]
            yield answer[1]
            return
        yield 200
        try:
            async for chunk in gathered(answer, self._stream_window_s):
                yield chunk
        finally:
            await answer.aclose()
            prefix = "chatcmpl" if endpoint == CHAT else "cmpl"
            await self._engine.abort(f"{prefix}-{rid}")  # no-op when it finished

    def check_health(self) -> None:
        """Ray Serve's health probe: a dead engine makes the replica restart."""
        if self._engine.errored:
            raise RuntimeError(f"vLLM engine for {self._served_name} has died")

    async def _generate(
        self, endpoint: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, bytes] | AsyncGenerator[str, None]:
        serving = self._chat if endpoint == CHAT else self._completion
        request_type = self._request_types.get(endpoint)
        if serving is None or request_type is None:
            return await invalid_body(f"{self._served_name} does not serve /v1/{endpoint}")
        try:
            request = request_type.model_validate(body)
        except ValidationError as exc:
            return await invalid_body(exc)
        raw = _raw_request(headers)
        try:
            if endpoint == CHAT:
                answer = await serving.create_chat_completion(request, raw)
            else:
                answer = await serving.create_completion(request, raw)
        except Exception as exc:  # vLLM raises its 400s (context too long) as exceptions
            return error_reply(exc)
        if hasattr(answer, "__aiter__"):
            return answer  # type: ignore[no-any-return]
        status = int(answer.error.code) if isinstance(answer, self._error_response) else 200
        return status, answer.model_dump_json().encode()

    async def _embed(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
        if self._embedding is None:
            return await invalid_body(f"{self._served_name} does not serve /v1/embeddings")
        try:
            request = self._embedding_request.validate_python(body)
        except ValidationError as exc:
            return await invalid_body(exc)
        try:
            response = await self._embedding(request, _raw_request(headers))
        except Exception as exc:
            return error_reply(exc)
        return int(response.status_code), bytes(response.body)


def _raw_request(headers: dict[str, str]) -> Request:
    """A minimal Starlette request: vLLM reads only its headers (trace context, request id)."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }
    return Request(scope)
