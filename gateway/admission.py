"""The admission seam: what stands between an authenticated request and the upstream.

The gateway calls `admit` before forwarding and `settle` with the actual usage afterwards, on
every path (success, error, disconnect, shutdown). Quotas plug in here; `OpenAdmission` admits all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.auth import Principal
from gateway.catalog import Model
from gateway.generation import Generation
from gateway.upstreams.base import Endpoint


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    principal: Principal
    model: Model
    request_id: str
    endpoint: Endpoint
    # The most the request can cost, the engine held to it (gateway/generation.py).
    generation: Generation


@dataclass(frozen=True, slots=True)
class Admitted:
    """A granted admission; `headers` go on the answer (e.g. `x-ratelimit-*`)."""

    headers: dict[str, str] = field(default_factory=dict)
    # Whatever the admission needs to settle it later (quotas: the reserved checks).
    reservation: Any = None


class Admission(Protocol):
    async def admit(self, request: AdmissionRequest) -> Admitted: ...

    async def settle(
        self, admitted: Admitted, *, prompt_tokens: int, completion_tokens: int
    ) -> None: ...
