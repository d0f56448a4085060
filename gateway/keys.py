"""Tenant API keys: `sk-sluis-<public id>-<secret>`.

The public id finds the key record; only a SHA-256 hash of the secret is stored. Secrets are 40
random base62 characters (~238 bits), so a fast hash is enough: nobody can brute-force them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

KEY_PREFIX = "sk-sluis-"
PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 40
_PUBLIC_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_PATTERN = re.compile(
    rf"{re.escape(KEY_PREFIX)}([a-z0-9]{{{PUBLIC_ID_LENGTH}}})-([A-Za-z0-9]{{{SECRET_LENGTH}}})"
)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    public_id: str
    secret: str


@dataclass(frozen=True, slots=True)
class NewKey:
    public_id: str
    secret_hash: str
    plaintext: str

    @property
    def prefix(self) -> str:
        return display_prefix(self.public_id)


def parse_key(candidate: str) -> ParsedKey | None:
    """Split a presented key, or None when it is not shaped like one of ours."""
    match = _KEY_PATTERN.fullmatch(candidate)
    if match is None:
        return None
    return ParsedKey(public_id=match.group(1), secret=match.group(2))


def looks_like_tenant_key(candidate: str) -> bool:
    return candidate.startswith(KEY_PREFIX)


def hash_secret(public_id: str, secret: str) -> str:
    # The public id is mixed in so that equal secrets of different keys hash differently.
    return hashlib.sha256(f"{public_id}:{secret}".encode()).hexdigest()


def secret_matches(parsed: ParsedKey, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(parsed.public_id, parsed.secret), stored_hash)


def generate_key() -> NewKey:
    public_id = "".join(secrets.choice(_PUBLIC_ID_ALPHABET) for _ in range(PUBLIC_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return NewKey(
        public_id=public_id,
        secret_hash=hash_secret(public_id, secret),
        plaintext=f"{KEY_PREFIX}{public_id}-{secret}",
    )


def display_prefix(public_id: str) -> str:
    """What lists show of a key: enough to recognise it, nothing that grants access."""
    return f"{KEY_PREFIX}{public_id}"
