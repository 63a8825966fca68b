"""Signed-in browsers, kept on the server.

The signed cookie alone cannot be taken back: a copy of it kept working after sign out, for as
long as it lasted. The cookie now carries a random key; the row it names is the session.
Deleting the row ends the session wherever the cookie was copied to.

How the person signed in decides what the session may do. An emailed manage or verification
link opens the preferences only; changing the address or password, downloading or erasing
the data takes the password, or a single-use "confirm it's you" link followed in the last
:data:`CONFIRM_FRESH` (a ``confirm`` session).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.customer import Customer, SignInSession

METHODS = ("password", "link", "confirm")
CONFIRM_FRESH = timedelta(minutes=15)
# ``last_seen_at`` is written at most this often per session, not on every request.
TOUCH_EVERY = timedelta(minutes=1)
USER_AGENT_CHARS = 200


@dataclass(frozen=True)
class Limits:
    """When a session ends by itself: ``idle`` after its last request, ``lifetime`` after
    the sign-in, whatever happens in between."""

    idle: timedelta
    lifetime: timedelta


def limits_from(config: Mapping[str, Any], lifetime: timedelta) -> Limits:
    """Idle time from the ``SESSION_IDLE_MINUTES`` setting; ``lifetime`` is the persistent
    cookie's (``PERMANENT_SESSION_LIFETIME``, 31 days), for every way of signing in."""
    return Limits(idle=timedelta(minutes=float(config["SESSION_IDLE_MINUTES"])),
                  lifetime=lifetime)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def start(session: Session, customer: Customer, method: str, user_agent: str | None,
          limits: Limits) -> tuple[str, SignInSession]:
    """A new session; returns the key for the cookie (only its hash is stored) and the row.
    The customer's sessions that ended by themselves are removed on the way."""
    if method not in METHODS:
        raise ValueError(f"unknown sign-in method {method}")
    now = utcnow()
    session.execute(delete(SignInSession).where(
        SignInSession.customer_id == customer.id, _expired(limits, now)))
    key = secrets.token_urlsafe(32)
    row = SignInSession(customer_id=customer.id, key_hash=key_hash(key), method=method,
                        user_agent=(user_agent or "")[:USER_AGENT_CHARS] or None,
                        created_at=now, last_seen_at=now)
    session.add(row)
    session.flush()
    return key, row


def _expired(limits: Limits, now: datetime) -> ColumnElement[bool]:
    return or_(SignInSession.last_seen_at < now - limits.idle,
               SignInSession.created_at < now - limits.lifetime)


def purge(session: Session, limits: Limits) -> int:
    """Remove every session that ended by itself, with its user agent: a customer who never
    comes back must not keep them until erasure."""
    result = session.execute(delete(SignInSession).where(_expired(limits, utcnow())))
    return int(getattr(result, "rowcount", 0) or 0)


def is_expired(row: SignInSession, limits: Limits, now: datetime) -> bool:
    return row.last_seen_at < now - limits.idle or row.created_at < now - limits.lifetime


def find(session: Session, key: str) -> SignInSession | None:
    return session.scalars(select(SignInSession).where(
        SignInSession.key_hash == key_hash(key))).first()


def resume(session: Session, key: str, public_id: str
           ) -> tuple[SignInSession, Customer] | None:
    """The session the cookie's key names, with its customer, if that is ``public_id``."""
    found = session.execute(
        select(SignInSession, Customer).join(Customer, Customer.id == SignInSession.customer_id)
        .where(SignInSession.key_hash == key_hash(key), Customer.public_id == public_id)
    ).first()
    return (found[0], found[1]) if found is not None else None


def needs_touch(row: SignInSession, now: datetime) -> bool:
    return now - row.last_seen_at >= TOUCH_EVERY


def touch(session: Session, row: SignInSession, now: datetime) -> None:
    """Record activity; the caller asks :func:`needs_touch` first, so at most once a minute."""
    session.execute(update(SignInSession).where(SignInSession.id == row.id)
                    .values(last_seen_at=now))
    row.last_seen_at = now


def active(session: Session, customer: Customer, limits: Limits) -> list[SignInSession]:
    """The customer's live sessions, most recently used first."""
    now = utcnow()
    rows = session.scalars(select(SignInSession).where(
        SignInSession.customer_id == customer.id).order_by(
        SignInSession.last_seen_at.desc(), SignInSession.id.desc())).all()
    return [row for row in rows if not is_expired(row, limits, now)]


def end(session: Session, customer: Customer, session_id: int) -> bool:
    """End one of the customer's sessions (another customer's id does nothing)."""
    result = session.execute(delete(SignInSession).where(
        SignInSession.customer_id == customer.id, SignInSession.id == session_id))
    return bool(getattr(result, "rowcount", 0))


def end_all(session: Session, customer: Customer, *, keep: int | None = None) -> None:
    """End every session of the customer, but ``keep`` if given."""
    statement = delete(SignInSession).where(SignInSession.customer_id == customer.id)
    if keep is not None:
        statement = statement.where(SignInSession.id != keep)
    session.execute(statement)


def may_change_credentials(row: SignInSession | None, now: datetime) -> bool:
    """Whether this session alone (no password typed) allows the sensitive changes: only a
    single-use confirmation link followed in the last :data:`CONFIRM_FRESH`."""
    return row is not None and row.method == "confirm" and now - row.created_at < CONFIRM_FRESH
