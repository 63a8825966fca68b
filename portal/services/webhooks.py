"""Webhook endpoints and their delivery from the change feed.

The feed is the outbox: each endpoint keeps a cursor into ``changes`` and the worker sends what
lies after it, one change at a time, moving the cursor only when the receiver answered 2xx. A
crash between the send and the cursor update means the change is sent again (at least once,
receivers dedupe on the event ``id``); it never means a change is lost or overtaken.

Every URL goes through the destination rule (:mod:`portal.core.outbound`) twice: :func:`create`
refuses private, reserved and malformed URLs and stores the normalised form, and each send
resolves the name again and connects to the address it checked. A refused destination, like
any other failure (and any exception at all), is a failed attempt of that endpoint alone:
it is logged as an outcome class, counts toward disabling the endpoint, and the other
endpoints are delivered in the same run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from portal.core import outbound
from portal.core.db import begin_write, utcnow
from portal.models.api import Webhook, WebhookDelivery
from portal.outbox import feed
from portal.outbox.models import Change

log = logging.getLogger("carnet.webhooks")

#: What became of one attempt, and the one sentence the delivery log shows for it. The log
#: keeps the class and the HTTP status, never the text of a network error.
OUTCOMES: dict[str, str | None] = {
    "delivered": None,
    "http_error": "The receiver answered with a status other than 2xx (redirects are not "
                  "followed).",
    "timeout": "The receiver did not answer in time.",
    "connection_failed": "The connection to the receiver failed.",
    "unresolvable": "The receiver's host name does not resolve.",
    "refused_destination": "The URL points to a private, reserved or local network "
                           "destination.",
    "invalid_url": "The URL is not valid.",
    "error": "The delivery failed for an unexpected reason.",
}


@dataclass(frozen=True)
class Policy:
    """Retry policy: exponential backoff with jitter, disabled after too long failing."""

    base_seconds: float = 10.0
    max_delay_seconds: float = 6 * 3600.0
    disable_after: timedelta = timedelta(days=3)
    max_attempts: int = 30
    timeout_seconds: float = 10.0
    lease_seconds: float = 120.0
    batch: int = 100
    #: ``WEBHOOK_ALLOW_PRIVATE_NETWORKS``: lifts the address rules of the destination rule.
    allow_private: bool = False
    resolver: outbound.Resolver = socket.getaddrinfo

    def delay(self, failures: int) -> timedelta:
        ceiling = min(self.max_delay_seconds, self.base_seconds * 2 ** max(0, failures - 1))
        return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, tolerance: int = 300,
           now: float | None = None) -> bool:
    """What a receiver runs (docs/api.md shows the same code)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        stamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - stamp) > tolerance:
        return False
    expected = sign(secret, body, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def create(session: Session, url: str, event_types: list[str],
           description: str | None = None, *, allow_private: bool = False) -> Webhook:
    """A new endpoint starts at the head of the feed: it receives what happens from now on.

    Raises :class:`portal.core.outbound.RefusedDestination` for a URL the destination rule
    refuses; stores the URL normalised (IDNA host, no fragment)."""
    destination = outbound.check_url(url, allow_private=allow_private)
    start = feed.head(session)
    hook = Webhook(public_id="whk_" + secrets.token_urlsafe(12), url=destination.url,
                   event_types=event_types, secret=new_secret(), description=description,
                   cursor_txid=start.txid, cursor_id=start.id, created_at=utcnow())
    session.add(hook)
    session.flush()
    return hook


def find(session: Session, public_id: str) -> Webhook | None:
    return session.scalars(select(Webhook).where(Webhook.public_id == public_id,
                                                 Webhook.deleted_at.is_(None))).first()


def list_all(session: Session) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.deleted_at.is_(None))
                                .order_by(Webhook.id)))


def enable(hook: Webhook) -> None:
    hook.disabled_at = hook.disabled_reason = hook.failing_since = hook.next_attempt_at = None
    hook.failures = 0


def as_json(hook: Webhook, *, with_secret: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": hook.public_id, "url": hook.url, "events": hook.event_types,
        "description": hook.description, "created_at": hook.created_at.isoformat(),
        "status": "disabled" if hook.disabled_at else ("failing" if hook.failures else "active"),
        "failures": hook.failures,
        "next_attempt_at": hook.next_attempt_at.isoformat() if hook.next_attempt_at else None,
        "disabled_reason": hook.disabled_reason,
        "cursor": feed.Cursor(hook.cursor_txid, hook.cursor_id).encode(),
    }
    if with_secret:
        out["secret"] = hook.secret
    return out


def deliveries(session: Session, hook: Webhook, limit: int = 100) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.webhook_id == hook.id).order_by(WebhookDelivery.id.desc()).limit(limit)))


def delivery_json(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id, "event": d.change_id, "type": d.event_type, "attempt": d.attempt,
        "ok": d.ok, "outcome": d.outcome, "status_code": d.status_code,
        "error": OUTCOMES.get(d.outcome, OUTCOMES["error"]),
        "duration_ms": d.duration_ms, "attempted_at": d.attempted_at.isoformat(),
        "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
    }


# --- delivery (run by the worker) --------------------------------------------------------------


def claim_due(session: Session, now: datetime, policy: Policy, limit: int = 50) -> list[int]:
    """Lease endpoints that are due. ``SKIP LOCKED`` lets several workers share the work on
    PostgreSQL; each endpoint is delivered by one worker at a time, which keeps its order."""
    ids = list(session.scalars(
        select(Webhook.id).where(
            Webhook.deleted_at.is_(None), Webhook.disabled_at.is_(None),
            or_(Webhook.leased_until.is_(None), Webhook.leased_until < now),
            or_(Webhook.next_attempt_at.is_(None), Webhook.next_attempt_at <= now),
        ).order_by(Webhook.id).limit(limit).with_for_update(skip_locked=True)))
    if ids:
        session.execute(update(Webhook).where(Webhook.id.in_(ids))
                        .values(leased_until=now + timedelta(seconds=policy.lease_seconds)))
    return ids


@dataclass(frozen=True)
class Attempt:
    outcome: str  # a key of OUTCOMES
    status_code: int | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"


def _refusal_outcome(refused: outbound.RefusedDestination) -> str:
    if refused.reason in ("private_address", "reserved_name"):
        return "refused_destination"
    if refused.reason == "unresolvable":
        return "unresolvable"
    return "invalid_url"


def post(client: httpx.Client, hook: Webhook, body: bytes, change: Change,
         policy: Policy) -> Attempt:
    """One signed POST to the address the destination rule checked just now. Redirects are
    not followed: a 3xx is a failure to fix at the receiver. Never raises: whatever goes
    wrong is this endpoint's failed attempt."""
    stamp = int(time.time())
    headers = {
        "Content-Type": "application/json", "User-Agent": "Carnet-Webhooks/1",
        "Carnet-Signature": sign(hook.secret, body, stamp),
        "Carnet-Event-Id": feed.Cursor(change.txid, change.id).encode(),
        "Carnet-Event-Type": change.type,
    }
    started = time.perf_counter()

    def attempt(outcome: str, status_code: int | None = None) -> Attempt:
        return Attempt(outcome, status_code, int((time.perf_counter() - started) * 1000))

    try:
        pinned = outbound.check_and_pin(hook.url, allow_private=policy.allow_private,
                                        resolver=policy.resolver)
        options = pinned.httpx_options()
        response = client.post(pinned.url, content=body,
                               headers={**headers, **options["headers"]},
                               extensions=options["extensions"],
                               timeout=policy.timeout_seconds, follow_redirects=False)
    except outbound.RefusedDestination as refused:
        return attempt(_refusal_outcome(refused))
    except httpx.TimeoutException:
        return attempt("timeout")
    except httpx.TransportError:
        return attempt("connection_failed")
    except httpx.InvalidURL:
        return attempt("invalid_url")
    except Exception as exc:  # contained: one endpoint's failure, never the run's
        log.warning("webhook %s: delivery raised %s", hook.public_id, type(exc).__name__)
        return attempt("error")
    if 200 <= response.status_code < 300:
        return attempt("delivered", response.status_code)
    return attempt("http_error", response.status_code)


def record(session: Session, hook: Webhook, change: Change, attempt: Attempt, now: datetime,
           policy: Policy) -> bool:
    """Log the attempt; on success move the cursor, on failure schedule the retry (or give
    up). True when the endpoint may go on to its next change."""
    hook.failures = 0 if attempt.ok else hook.failures + 1
    row = WebhookDelivery(webhook_id=hook.id, change_id=change.id, event_type=change.type,
                          attempt=1 if attempt.ok else hook.failures, ok=attempt.ok,
                          outcome=attempt.outcome, status_code=attempt.status_code,
                          duration_ms=attempt.duration_ms, attempted_at=now)
    if attempt.ok:
        hook.cursor_txid, hook.cursor_id = change.txid, change.id
        hook.failing_since = hook.next_attempt_at = None
        session.add(row)
        return True
    _schedule_retry(hook, now, policy)
    row.next_attempt_at = hook.next_attempt_at
    session.add(row)
    return False


def _schedule_retry(hook: Webhook, now: datetime, policy: Policy) -> None:
    """After a failure: the next attempt after a backoff, or disable the endpoint."""
    hook.failing_since = hook.failing_since or now
    if hook.failures >= policy.max_attempts or now - hook.failing_since >= policy.disable_after:
        hook.disabled_at = now
        hook.disabled_reason = f"failed {hook.failures} times since {hook.failing_since:%Y-%m-%d}"
        hook.next_attempt_at = None
    else:
        hook.next_attempt_at = now + policy.delay(hook.failures)
    hook.leased_until = None


def record_crash(session: Session, hook_id: int, change: Change | None, now: datetime,
                 policy: Policy) -> None:
    """An exception escaped the delivery of one endpoint (a row its code cannot handle):
    one failed attempt (outcome ``error``) of that endpoint, with backoff and in time
    disabling, like any failure. The run goes on with the other endpoints."""
    hook = session.get(Webhook, hook_id)
    if hook is None:
        return
    if change is not None:
        record(session, hook, change, Attempt("error", None, 0), now, policy)
        return
    hook.failures += 1
    _schedule_retry(hook, now, policy)


def deliver_endpoint(make_session: Callable[[], Session], client: httpx.Client, hook_id: int,
                     policy: Policy, clock: Callable[[], datetime] = utcnow) -> int:
    """Send an endpoint's pending changes in order until done, failing or out of time.

    The one service that manages its own transactions: it must not hold one open across
    network calls, and each delivered change must be recorded before the next is sent.
    """
    sent = 0
    deadline = time.monotonic() + policy.lease_seconds / 2
    session = make_session()
    change: Change | None = None
    try:
        while time.monotonic() < deadline:
            change = None
            with begin_write(session):
                hook = session.get(Webhook, hook_id)
                if hook is None or hook.disabled_at or hook.deleted_at:
                    return sent
                rows, _ = feed.read(session, feed.Cursor(hook.cursor_txid, hook.cursor_id),
                                    policy.batch)
                change = None
                for row in rows:
                    if feed.matches(row.type, hook.event_types):
                        change = row
                        break
                    # Not subscribed: step over it without sending.
                    hook.cursor_txid, hook.cursor_id = row.txid, row.id
                if change is None:
                    if len(rows) == policy.batch:
                        continue  # a long run of unsubscribed changes: read on
                    hook.leased_until = None
                    return sent
                body = json.dumps(feed.as_json(session, [change])[0],
                                  separators=(",", ":")).encode()
            attempt = post(client, hook, body, change, policy)
            with begin_write(session):
                hook = session.get(Webhook, hook_id)
                assert hook is not None
                if not record(session, hook, change, attempt, clock(), policy):
                    hook.leased_until = None
                    return sent
                sent += 1
        with begin_write(session):
            session.execute(update(Webhook).where(Webhook.id == hook_id)
                            .values(leased_until=None))
        return sent
    except Exception as exc:
        log.warning("webhook endpoint %s: delivery raised %s; counted as a failed attempt",
                    hook_id, type(exc).__name__)
        session.rollback()
        failed = change
        with begin_write(session):
            record_crash(session, hook_id, failed, clock(), policy)
        return sent
    finally:
        session.close()


def prune(session: Session, older_than: datetime) -> int:
    result = session.execute(delete(WebhookDelivery).where(
        WebhookDelivery.attempted_at < older_than))
    return int(getattr(result, "rowcount", 0) or 0)
