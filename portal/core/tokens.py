"""Signed, purpose-bound, expiring tokens for emailed links.

A token signed for one purpose never verifies for another (the purpose is the salt). Links
that must work once carry either a fingerprint of the state they change (password reset:
using them changes the fingerprint and the link dies) or a random id recorded when used
(:func:`portal.services.accounts.use_link_once`).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

PURPOSES = {
    "verify-email": 3 * 24 * 3600,
    "change-email": 24 * 3600,
    "reset-password": 3600,
    "manage": 7 * 24 * 3600,
    # Single-use (their ids go to used_links): asked for to confirm a sensitive change, and
    # sent to the old address after a change of address, to take it back.
    "confirm-identity": 15 * 60,
    "undo-email-change": 7 * 24 * 3600,
    "confirm-consent": 14 * 24 * 3600,
    "unsubscribe": 400 * 24 * 3600,
}


class TokenError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "expired" or "invalid"


def _serializer(secret: str, purpose: str) -> URLSafeTimedSerializer:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown token purpose {purpose}")
    return URLSafeTimedSerializer(secret, salt=f"carnet/{purpose}")


def make_token(secret: str, purpose: str, payload: dict[str, Any]) -> str:
    return _serializer(secret, purpose).dumps(payload)


def read_token(secret: str, purpose: str, token: str, max_age: int | None = None) -> dict[str, Any]:
    try:
        data = _serializer(secret, purpose).loads(token, max_age=max_age or PURPOSES[purpose])
    except SignatureExpired as exc:
        raise TokenError("expired") from exc
    except BadSignature as exc:
        raise TokenError("invalid") from exc
    if not isinstance(data, dict):
        raise TokenError("invalid")
    return data


def new_link_id() -> str:
    return secrets.token_urlsafe(16)


def fingerprint(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]
