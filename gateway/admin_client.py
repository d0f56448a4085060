"""A small client for the admin API, used by the `sluis` CLI."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any

import httpx


class AdminError(Exception):
    """The admin API refused, or could not be reached; the message is for people."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AdminClient:
    def __init__(
        self, base_url: str, token: str, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._url = base_url.rstrip("/")
        headers = {"authorization": f"Bearer {token}", "x-sluis-actor": _actor()}
        self._client = httpx.Client(
            base_url=self._url + "/admin/v1", headers=headers, timeout=30, transport=transport
        )

    @classmethod
    def from_env(cls, url: str | None = None, token: str | None = None) -> AdminClient:
        url = url or os.environ.get("SLUIS_URL", "http://127.0.0.1:8000")
        token = token or os.environ.get("SLUIS_ADMIN_TOKEN") or _token_from_state_dir()
        if not token:
            raise AdminError(
                "no admin token: set SLUIS_ADMIN_TOKEN (see .sluis/admin_token)", exit_code=2
            )
        return cls(url, token)

    def call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        try:
            response = self._client.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise AdminError(
                f"cannot reach the gateway at {self._url}: {exc}", exit_code=2
            ) from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                detail = f"{error['message']} ({error['code']})"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200]
            raise AdminError(f"{response.status_code}: {detail}")
        return response.json()

    def close(self) -> None:
        self._client.close()


def _token_from_state_dir() -> str | None:
    path = Path(os.environ.get("SLUIS_STATE_DIR", ".sluis")) / "admin_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "admin"
