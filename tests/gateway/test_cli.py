"""The `sluis` CLI: admin commands against a live gateway, and the servers as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.admin_client import AdminClient
from gateway.cli import main
from loadtests.processes import free_port
from tests.conftest import ADMIN_TOKEN, RunningGateway
from tests.servers import ServerThread


@pytest.fixture
def cli_env(gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> RunningGateway:
    monkeypatch.setenv("SLUIS_URL", gateway.url)
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", ADMIN_TOKEN)
    return gateway


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_tenants_keys_usage_audit(
    cli_env: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "tenants",
        "create",
        "acme",
        "--models",
        "fake-chat",
        "--meta",
        "contact=ops@acme.eu",
    )
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "ID", "STATUS", "MODELS", "CREATED_AT"]
    assert "acme" in out and "fake-chat" in out

    code, out, _ = run_cli(capsys, "keys", "create", "acme", "--json")
    created = json.loads(out)
    assert created["key"].startswith("sk-sluis-")
    response = httpx.post(
        f"{cli_env.url}/v1/completions",
        json={"model": "fake-chat", "prompt": "a b", "max_tokens": 3},
        headers={"authorization": f"Bearer {created['key']}"},
    )
    assert response.status_code == 200
    cli_env.flush()

    code, out, _ = run_cli(capsys, "usage", "--tenant", "acme", "--json")
    [total] = json.loads(out)["data"]
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == (1, 2, 3)
    code, out, _ = run_cli(capsys, "usage")
    assert out.splitlines()[1].split() == ["acme", "fake-chat", "1", "2", "3", "5"]

    code, out, _ = run_cli(capsys, "keys", "rotate", created["id"], "--grace-hours", "1")
    assert code == 0 and "new key (shown only now): sk-sluis-" in out
    code, out, _ = run_cli(capsys, "keys", "list", "acme", "--json")
    assert len(json.loads(out)["data"]) == 2
    code, out, _ = run_cli(capsys, "keys", "revoke", created["id"])
    assert code == 0
    code, out, _ = run_cli(capsys, "tenants", "suspend", "acme", "--json")
    assert json.loads(out)["status"] == "suspended"
    code, out, _ = run_cli(capsys, "audit", "--json")
    actions = [entry["action"] for entry in json.loads(out)["data"]]
    assert actions == ["tenant.suspend", "key.revoke", "key.rotate", "key.create", "tenant.create"]


def test_errors_are_clear_and_exit_nonzero(
    cli_env: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capsys, "tenants", "get", "nobody")
    assert code == 1 and "404" in err and "tenant_not_found" in err
    monkeypatch.setenv("SLUIS_ADMIN_TOKEN", "wrong-token-000000000")
    code, _, err = run_cli(capsys, "tenants", "list")
    assert code == 1 and "invalid_admin_token" in err
    monkeypatch.setenv("SLUIS_URL", "http://127.0.0.1:9")
    code, _, err = run_cli(capsys, "tenants", "list")
    assert code == 2 and "cannot reach the gateway" in err


def test_admin_token_from_a_file(
    cli_env: RunningGateway,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cli_env.create_tenant("acme")
    monkeypatch.delenv("SLUIS_ADMIN_TOKEN")
    monkeypatch.setenv("SLUIS_STATE_DIR", str(tmp_path / "no-state"))
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    code, out, err = run_cli(capsys, "tenants", "list", "--admin-token-file", str(token_file))
    assert (code, err) == (0, "")
    assert "acme" in out
    code, _, err = run_cli(
        capsys, "tenants", "list", "--admin-token-file", str(tmp_path / "missing")
    )
    assert code == 2 and "admin token file" in err and str(tmp_path / "missing") in err


def test_admin_token_on_the_command_line_works_with_a_warning(
    cli_env: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_env.create_tenant("acme")
    monkeypatch.delenv("SLUIS_ADMIN_TOKEN")
    code, out, err = run_cli(capsys, "tenants", "list", "--admin-token", ADMIN_TOKEN)
    assert code == 0 and "acme" in out
    assert "--admin-token-file" in err and ADMIN_TOKEN not in err


def _sluis(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_sluis_gateway_process_in_front_of_an_upstream(
    tmp_path: Path, fake_engine_server: ServerThread
) -> None:
    port = free_port()
    args = ("gateway", "--upstream", fake_engine_server.url, "--port", str(port))
    env = {"SLUIS_ADMIN_TOKEN": ADMIN_TOKEN, "SLUIS_METRICS_PORT": str(free_port())}
    process = _sluis(*args, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        httpx.post(
            f"{url}/admin/v1/tenants", json={"name": "acme", "models": ["*"]}, headers=headers
        )
        key = httpx.post(f"{url}/admin/v1/tenants/acme/keys", json={}, headers=headers).json()[
            "key"
        ]
        models = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert [m["id"] for m in models.json()["data"]] == ["fake-chat", "fake-embed"]
        # A second gateway on the same port is refused, not silently sharing it.
        second = _sluis(*args, cwd=tmp_path, env=env)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 2 and "already in use" in out
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "gateway stopped" in out


def test_sluis_up_prints_a_working_demo_key(tmp_path: Path) -> None:
    port = free_port()
    process = _sluis(
        "up", "--port", str(port), cwd=tmp_path, env={"SLUIS_METRICS_PORT": str(free_port())}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        assert process.stdout is not None
        lines = []
        while not any("demo tenant key" in line for line in lines):
            lines.append(process.stdout.readline())
        key = re.search(r"sk-sluis-\S+", "".join(lines))
        assert key is not None
        assert any(str(Path(".sluis") / "admin_token") in line for line in lines)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"authorization": f"Bearer {key.group(0)}"},
            json={"model": "fake-chat", "messages": [{"role": "user", "content": "Hallo"}]},
        )
        assert answer.status_code == 200
        assert (tmp_path / ".sluis" / "admin_token").stat().st_mode & 0o777 == 0o600
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "gateway stopped" in out


def test_quotas_from_the_cli(cli_env: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "tenants", "create", "acme", "--models", "*")
    code, out, _ = run_cli(
        capsys,
        "tenants",
        "update",
        "acme",
        "--quota",
        "requests_per_minute=60",
        "--quota",
        "eur_per_month=2.5",
        "--quota",
        "fake-chat/max_concurrent=2",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["quotas"] == {
        "requests_per_minute": 60,
        "eur_per_month": 2.5,
        "models": {"fake-chat": {"max_concurrent": 2}},
    }
    code, out, _ = run_cli(
        capsys,
        "tenants",
        "update",
        "acme",
        "--quota",
        "eur_per_month=default",
        "--quota",
        "requests_per_minute=none",
        "--json",
    )
    assert json.loads(out)["quotas"] == {
        "requests_per_minute": "unlimited",
        "models": {"fake-chat": {"max_concurrent": 2}},
    }
    code, out, _ = run_cli(capsys, "tenants", "quota", "acme")
    assert code == 0
    assert out.splitlines()[1].split()[:4] == ["fake-chat", "concurrency", "2", "0"]
    code, _, err = run_cli(capsys, "tenants", "update", "acme", "--quota", "max_concurrent=-1")
    assert code == 1 and "400" in err


def test_quota_updates_send_a_merge_patch(
    cli_env: RunningGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One PATCH naming only the changed fields: nothing read first, so nothing overwritten."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        request.read()
        forwarded = httpx.request(
            request.method, str(request.url), headers=request.headers, content=request.content
        )
        return httpx.Response(
            forwarded.status_code, headers=forwarded.headers, content=forwarded.content
        )

    def recording_client(url: str | None = None, token: str | None = None) -> AdminClient:
        return AdminClient(cli_env.url, ADMIN_TOKEN, transport=httpx.MockTransport(record))

    monkeypatch.setattr(AdminClient, "from_env", recording_client)
    run_cli(capsys, "tenants", "create", "acme", "--models", "*")
    cli_env.admin("PATCH", "/tenants/acme", json={"quotas": {"tokens_per_day": 500}})
    sent.clear()
    code, out, _ = run_cli(
        capsys,
        "tenants",
        "update",
        "acme",
        "--quota",
        "requests_per_minute=unlimited",
        "--quota",
        "fake-chat/max_concurrent=2",
        "--quota",
        "eur_per_month=default",
        "--json",
    )
    assert code == 0
    assert [(request.method, request.url.path) for request in sent] == [
        ("PATCH", "/admin/v1/tenants/acme")
    ]
    assert json.loads(sent[0].content) == {
        "quotas": {
            "requests_per_minute": "unlimited",
            "eur_per_month": None,
            "models": {"fake-chat": {"max_concurrent": 2}},
        }
    }
    assert json.loads(out)["quotas"] == {
        "tokens_per_day": 500,
        "requests_per_minute": "unlimited",
        "models": {"fake-chat": {"max_concurrent": 2}},
    }


def test_quota_update_if_match(cli_env: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "tenants", "create", "acme", "--models", "*")
    code, out, _ = run_cli(capsys, "tenants", "get", "acme", "--json")
    version = json.loads(out)["version"]
    code, out, _ = run_cli(
        capsys,
        "tenants",
        "update",
        "acme",
        "--quota",
        "tokens_per_day=5",
        "--if-match",
        str(version),
        "--json",
    )
    assert code == 0 and json.loads(out)["version"] == version + 1
    code, _, err = run_cli(
        capsys,
        "tenants",
        "update",
        "acme",
        "--quota",
        "tokens_per_day=6",
        "--if-match",
        str(version),
    )
    assert code == 1 and "412" in err and "precondition_failed" in err
    assert cli_env.admin("GET", "/tenants/acme").json()["quotas"] == {"tokens_per_day": 5}
