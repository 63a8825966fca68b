"""API keys for sending systems.

A key is 32 random bytes (256 bits) shown once; the database keeps its SHA-256. A slow password
hash (argon2, bcrypt) protects low-entropy secrets people choose; a key this long cannot be
guessed or brute-forced from its digest, so a fast hash is enough and lets every request find its
key with one indexed lookup instead of verifying against every stored hash.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import typing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, and_, bindparam, cast, or_, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.core.fast_rows import fetch_rows
from portal.models.api import ApiKey
from portal.services.decisions import Guard

SCOPES: tuple[str, ...] = (
    "decisions:read", "audiences:read", "customers:write", "consent:write", "loyalty:write",
    "push:send", "webhooks:manage", "events:read", "links:write",
)
# `links:write` mints unsubscribe links, each of which withdraws consent when followed: a key
# that only reads decisions must not be able to do that, so it is a scope of its own.
KEY_PREFIX = "carnet_"
# Recording every use would turn each read into a write; a minute is precise enough to see
# which keys are still in use before revoking them.
LAST_USED_GRANULARITY = timedelta(minutes=1)


class ApiKeyError(ValueError):
    pass


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    secret: str  # the only time the full key exists outside the client


def digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_key(session: Session, name: str, scopes: list[str]) -> NewKey:
    name = name.strip()
    if not name or len(name) > 80:
        raise ApiKeyError("name must be 1 to 80 characters")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ApiKeyError(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise ApiKeyError("give at least one scope")
    if session.scalars(select(ApiKey).where(ApiKey.name == name)).first() is not None:
        raise ApiKeyError(f"a key named '{name}' already exists")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=secret[:12], key_hash=digest(secret),
                 scopes=sorted(set(scopes)))
    session.add(key)
    session.flush()
    return NewKey(key, secret)


_BY_HASH = select(ApiKey.id, ApiKey.name, ApiKey.scopes, ApiKey.last_used_at).where(
    ApiKey.key_hash == bindparam("hash"), ApiKey.revoked_at.is_(None))


@dataclass
class Caller:
    """The key a request was authenticated with: what views and the rate limit need."""

    id: int
    name: str
    scopes: list[str]
    last_used_at: datetime | None


def well_formed(raw: str) -> bool:
    """Whether ``raw`` could be a key at all (checked before any lookup)."""
    return raw.startswith(KEY_PREFIX) and len(raw) <= 200


def authenticate(session: Session, raw: str) -> Caller | None:
    """The live key matching ``raw``, or None. A revoked key fails at once: no cache. One
    indexed lookup of four columns (no ORM object), so it costs about what reading a
    revocation counter would."""
    if not well_formed(raw):
        return None
    rows = fetch_rows(session, _BY_HASH, {"hash": digest(raw)})
    return Caller(*rows[0]) if rows else None


def _live_key() -> Any:
    return and_(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))


# The key as a Guard of the single decision: read in the decision's own statement, and nobody
# looked up for a key that does not exist (so a request without a valid key cannot time who
# is a customer). Its columns borrow the labels of the decision statement's.
KEY_GUARD = Guard(
    holds=select(ApiKey.id).where(_live_key()).exists(),
    rows=typing.cast(Select[Any], select(
        ApiKey.id.label("customer_id"), ApiKey.name.label("public_id"),
        cast(ApiKey.scopes, String).label("decision_facts"),
        ApiKey.last_used_at.label("erased_at")).where(_live_key())))


def guard_params(raw: str) -> dict[str, str]:
    return {"key_hash": digest(raw)}


def caller_of(guarded: list[dict[str, Any]]) -> Caller | None:
    """The caller from the rows :data:`KEY_GUARD` returned (none: no such live key)."""
    if not guarded:
        return None
    row = guarded[0]
    return Caller(row["customer_id"], row["public_id"], json.loads(row["decision_facts"]),
                  row["erased_at"])


def needs_touch(key: ApiKey | Caller, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return key.last_used_at is None or key.last_used_at < now - LAST_USED_GRANULARITY


def touch(session: Session, key: ApiKey | Caller, now: datetime | None = None) -> None:
    """Record use, at most once a minute. Its own short write transaction (SQLite cannot
    upgrade a read transaction to a write under concurrent writers); conditional, so the
    requests of the same minute racing here write once."""
    now = now or utcnow()
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, or_(ApiKey.last_used_at.is_(None),
                                        ApiKey.last_used_at < now - LAST_USED_GRANULARITY))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    key.last_used_at = now


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, name_or_id: str) -> ApiKey:
    query = select(ApiKey).where(ApiKey.name == name_or_id)
    key = session.scalars(query).first()
    if key is None and name_or_id.isdigit():
        key = session.get(ApiKey, int(name_or_id))
    if key is None:
        raise ApiKeyError(f"no key named or numbered '{name_or_id}'")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key
