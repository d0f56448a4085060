"""vLLM's own error answers, produced without its FastAPI app.

vLLM's API server turns exceptions into `ErrorResponse` bodies in FastAPI exception handlers;
a deployment calling the serving classes directly gets the exceptions. These helpers give the
same status and body the API server would: 400 for a prompt beyond the context, for a body
that fails validation, 404 for an unknown model, 500 only for what vLLM itself calls a 500.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def error_reply(exc: Exception) -> tuple[int, bytes]:
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    response = create_error_response(exc)
    return int(response.error.code), response.model_dump_json().encode()


async def invalid_body(problem: Any) -> tuple[int, bytes]:
    """A request body vLLM would refuse: a pydantic `ValidationError` or a message."""
    from pydantic import ValidationError

    if not isinstance(problem, ValidationError):
        return error_reply(ValueError(str(problem)))
    from fastapi.exceptions import RequestValidationError
    from starlette.requests import Request
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        validation_exception_handler,
    )

    errors = [{**e, "loc": ("body", *e["loc"])} for e in problem.errors(include_url=False)]
    app = SimpleNamespace(state=SimpleNamespace(args=SimpleNamespace(log_error_stack=False)))
    scope = {"type": "http", "app": app, "method": "POST", "path": "/", "headers": []}
    response = await validation_exception_handler(
        Request({**scope, "query_string": b""}), RequestValidationError(errors)
    )
    return int(response.status_code), bytes(response.body)
