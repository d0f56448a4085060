"""Client behaviours the tests need more than once."""

from __future__ import annotations

from typing import Any

import httpx


def leave_mid_stream(url: str, key: str, *, max_tokens: int, delay_s: float) -> None:
    """Start a slow streamed chat and hang up after the first token arrives."""
    body = {
        "model": "fake-chat",
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [{"role": "user", "content": f"slow [[delay:{delay_s}]]"}],
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return


def admin_request(url: str, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One call to a gateway's admin API (`/admin/v1{path}`) with the admin token."""
    return httpx.request(
        method,
        f"{url}/admin/v1{path}",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
        **kwargs,
    )
