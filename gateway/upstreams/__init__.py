"""Where requests go after admission: one small protocol, several backends.

`UPSTREAMS` maps the `upstream.kind` of the config to a factory; an unknown kind fails at start-up.
"""

from __future__ import annotations

from gateway.upstreams.base import Endpoint, Upstream, UpstreamCall, UpstreamReply

__all__ = ["Endpoint", "Upstream", "UpstreamCall", "UpstreamReply"]
