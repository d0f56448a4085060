"""Reading request bodies with a hard size limit, enforced while reading."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from gateway.errors import ClientClosedRequest, InvalidRequest, PayloadTooLarge


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The whole body, or `PayloadTooLarge` as soon as it passes `limit` bytes.

    A declared Content-Length over the limit is refused before reading anything; a body sent
    without one (chunked) is cut off as soon as it grows past the limit, so memory stays bounded.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
    except ClientDisconnect as exc:
        raise ClientClosedRequest("The client closed the connection mid-request.") from exc
    return b"".join(parts)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return payload


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
