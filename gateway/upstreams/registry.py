"""Upstream backends by name, as the config's `upstream.kind` names them."""

from __future__ import annotations

from collections.abc import Callable

from gateway.settings import ConfigError, UpstreamConfig
from gateway.upstreams.base import Upstream
from gateway.upstreams.fake import FakeUpstream
from gateway.upstreams.http import HTTPUpstream


def _http(config: UpstreamConfig) -> Upstream:
    if not config.url:
        raise ConfigError("upstream.url: an http upstream needs a url (or pass --upstream URL)")
    return HTTPUpstream(config)


def _fake(config: UpstreamConfig) -> Upstream:
    return FakeUpstream()


UPSTREAMS: dict[str, Callable[[UpstreamConfig], Upstream]] = {"http": _http, "fake": _fake}


def build_upstream(config: UpstreamConfig) -> Upstream:
    factory = UPSTREAMS.get(config.kind)
    if factory is None:
        raise ConfigError(f"upstream.kind: unknown {config.kind!r}; known: {sorted(UPSTREAMS)}")
    return factory(config)
