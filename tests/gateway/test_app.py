"""The application as `create_app` builds it: the admin token file, the crash answer."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from gateway.app import admin_token_path, resolve_admin_token
from gateway.settings import ConfigError, Settings
from gateway.upstreams.base import UpstreamCall, UpstreamModel, UpstreamReply
from tests.conftest import GatewayFactory
from tests.gateway.errors import assert_openai_error


def _settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_admin_token_file_is_private(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    token = resolve_admin_token(settings)
    path = admin_token_path(settings)
    assert path.read_text().strip() == token
    assert _mode(path) == 0o600
    assert resolve_admin_token(settings) == token  # read back on the next start


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_an_admin_token_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    settings = _settings(tmp_path)
    path = admin_token_path(settings)
    path.parent.mkdir(parents=True)
    path.write_text("sluis-admin-" + "x" * 32 + "\n")
    path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as refused:
        resolve_admin_token(settings)
    assert str(path) in str(refused.value) and oct(mode)[2:] in str(refused.value)
    assert "x" * 32 not in str(refused.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_replaced_admin_token_file_is_private(tmp_path: Path, mode: int) -> None:
    """A file too short to be a token is replaced by a new file, whatever the old one's mode."""
    settings = _settings(tmp_path)
    path = admin_token_path(settings)
    path.parent.mkdir(parents=True)
    path.write_text("short\n")
    path.chmod(mode)
    token = resolve_admin_token(settings)
    assert path.read_text().strip() == token and len(token) >= 16
    assert _mode(path) == 0o600


class CrashingUpstream:
    """An upstream client with a bug: every call raises something no layer expects."""

    async def list_models(self) -> list[UpstreamModel]:
        return [UpstreamModel("fake-chat")]

    async def send(self, call: UpstreamCall) -> UpstreamReply:
        raise RuntimeError("a bug in the upstream client")

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        raise RuntimeError("a bug in the upstream client")
        yield  # pragma: no cover

    async def aclose(self) -> None:
        return None


def test_a_crash_answers_500_with_one_request_id(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(upstream=CrashingUpstream())
    key = gateway.create_tenant("acme")
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
    )
    error = assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert len(response.headers.get_list("x-request-id")) == 1
    [record] = gateway.records()
    assert record["request_id"] == response.headers["x-request-id"]
    assert (record["status"], record["prompt_tokens"], record["completion_tokens"]) == (500, 0, 0)
