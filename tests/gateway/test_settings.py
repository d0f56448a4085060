from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import ConfigError, load_settings


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.port == 8000
    assert settings.database_url.startswith("sqlite+aiosqlite://")


def test_file_environment_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sluis.yaml"
    config.write_text(
        "upstream:\n  kind: http\n  url: http://10.0.0.1:8000\n"
        "models:\n  - id: tiny-chat\n    upstream_model: tiny\n"
    )
    monkeypatch.setenv("SLUIS_PORT", "9000")
    settings = load_settings(config, host="0.0.0.0")
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.upstream().url == "http://10.0.0.1:8000"
    assert settings.file.models[0].upstream_model == "tiny"
    flagged = load_settings(config, upstream_url="http://127.0.0.1:1")
    assert flagged.upstream().url == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  - id: a\n    task: dance\n", "models.0.task"),
        ("upstream:\n  kind: carrier-pigeon\n", "upstream.kind"),
        ("models:\n  - id: a\n  - id: a\n", "listed twice"),
        ("surprise: 1\n", "surprise"),
        ("models: [\n", "not valid YAML"),
        ("- 1\n", "top level must be a mapping"),
    ],
)
def test_bad_file_names_the_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "sluis.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert str(config) in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SLUIS_PORT", "eighty", "port"),
        ("SLUIS_ADMIN_TOKEN", "short", "admin_token"),
        ("SLUIS_ADMIN_TOKEN", "sk-sluis-looks-like-a-tenant-key", "tenant key"),
    ],
)
def test_bad_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
