"""Errors a client can see, each with its HTTP status and OpenAI-style `type` and `code`.

SluisError
 ├── InvalidRequest          400 invalid_request_error
 ├── AuthenticationFailed    401 authentication_error
 ├── PermissionDenied        403 permission_error
 ├── NotFound                404 not_found_error
 ├── Conflict                409 conflict_error
 ├── PayloadTooLarge         413 invalid_request_error
 ├── RateLimited             429 rate_limit_error (with Retry-After and x-ratelimit-* headers)
 ├── ClientClosedRequest     499 the client left before its request was read (nobody to tell)
 ├── UpstreamRejected        4xx passed on from the model server (its status; message sanitised)
 ├── UpstreamFailed          502 upstream_error
 ├── UpstreamTimeout         504 upstream_error
 └── ServiceUnavailable      503 service_unavailable_error (always with Retry-After)
      ├── UpstreamUnavailable     the model server cannot be reached
      └── StoreUnavailable        the tenant store cannot be reached

One renderer (`error_body`) turns any of them into `{"error": {message, type, code, param}}`.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class SluisError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retry_after = retry_after

    @property
    def status_code(self) -> int:
        return self.status

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(self.retry_after)}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(SluisError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class AuthenticationFailed(SluisError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(SluisError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(SluisError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(SluisError):
    status = 409
    type = "conflict_error"
    default_code = "conflict"


class PayloadTooLarge(SluisError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(SluisError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retry_after: int,
        headers: dict[str, str],
        param: str | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, retry_after=retry_after)
        self._extra_headers = headers

    def headers(self) -> dict[str, str]:
        return {**self._extra_headers, **super().headers()}


class ClientClosedRequest(SluisError):
    status = 499
    type = "client_closed_request"
    default_code = "client_closed_request"


class UpstreamRejected(SluisError):
    """The model server refused the request (its 4xx), e.g. a prompt longer than the context."""

    type = "invalid_request_error"
    default_code = "upstream_rejected"

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, code=code, param=param)
        self._status = status

    @property
    def status_code(self) -> int:
        return self._status


class UpstreamFailed(SluisError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(SluisError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"


class ServiceUnavailable(SluisError):
    status = 503
    type = "service_unavailable_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class UpstreamUnavailable(ServiceUnavailable):
    default_code = "upstream_unavailable"


class StoreUnavailable(ServiceUnavailable):
    default_code = "store_unavailable"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    )
