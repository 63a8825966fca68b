"""Web push at run time: the VAPID key as configured, one sender per process, and the
worker jobs that fan messages out and deliver them.

The key is loaded, never created: ``flask --app app push vapid-keys`` makes it once. When it
is configured but missing or unreadable, push features show as unavailable and the reason is
logged once; nothing silently generates a replacement that would orphan every subscription.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from urllib.parse import urlsplit

from flask import Flask
from flask.sansio.app import App
from sqlalchemy.orm import Session

from portal.core.db import new_session, utcnow
from portal.push import messages as push_messages
from portal.push.models import PushMessage
from portal.push.webpush import (
    InvalidPushOptions,
    PayloadTooLarge,
    PushOutcome,
    VapidKeys,
    WebPushError,
    WebPushSender,
    load_vapid_private_key,
)
from portal.services.catalog import get_catalog

log = logging.getLogger("carnet.push")
EXTENSION = "carnet.push"
SEND_CHUNK = 50
SEND_THREADS = 8


class PushUnavailable(RuntimeError):
    """Web push is not configured (no VAPID key, or an unreadable one)."""


def check_subject(subject: str) -> str:
    """``VAPID_SUBJECT`` must be a mailto: address or an https: URL (Safari rejects others)."""
    parts = urlsplit(subject.strip())
    if (parts.scheme == "mailto" and "@" in parts.path) or (
            parts.scheme == "https" and parts.hostname):
        return subject.strip()
    raise ValueError(f"CARNET_VAPID_SUBJECT must be a mailto: address or an https: URL, "
                     f"got {subject!r}")


def allow_http(app: Flask) -> bool:
    """Browsers only hand out https endpoints; http is for local push services in tests."""
    return bool(app.config["ENV"] == "development" or app.config.get("TESTING"))


def _state(app: Flask) -> dict[str, object]:
    return app.extensions.setdefault(EXTENSION, {})  # type: ignore[no-any-return]


def vapid_keys(app: Flask) -> VapidKeys:
    """The configured key pair, loaded once per process; :class:`PushUnavailable` otherwise."""
    state = _state(app)
    keys = state.get("keys")
    if isinstance(keys, VapidKeys):
        return keys
    source = app.config.get("VAPID_PRIVATE_KEY")
    if not source:
        raise PushUnavailable("CARNET_VAPID_PRIVATE_KEY is not set; generate a key with "
                              "`flask --app app push vapid-keys` and configure it.")
    try:
        loaded = load_vapid_private_key(source)
    except WebPushError as exc:
        if not state.get("warned"):
            log.error("web push unavailable: %s", exc)
            state["warned"] = True
        raise PushUnavailable(str(exc)) from exc
    state["keys"] = loaded
    return loaded


def public_key(app: Flask) -> str | None:
    """The ``applicationServerKey`` for the browser, or None when push is unavailable."""
    try:
        return vapid_keys(app).public_key
    except PushUnavailable:
        return None


def sender(app: Flask) -> WebPushSender:
    state = _state(app)
    existing = state.get("sender")
    if isinstance(existing, WebPushSender):
        return existing
    made = WebPushSender(vapid_keys(app), check_subject(app.config["VAPID_SUBJECT"]),
                         timeout=float(app.config["PUSH_TIMEOUT_SECONDS"]),
                         allow_http=allow_http(app),
                         allow_private=bool(app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"]))
    state["sender"] = made
    return made


def policy(app: Flask) -> push_messages.RetryPolicy:
    return push_messages.RetryPolicy(base_seconds=float(app.config["PUSH_RETRY_BASE_SECONDS"]))


# --- worker jobs -------------------------------------------------------------------------------


def fan_out(app: Flask, now: datetime | None = None) -> int:
    """Expand pending messages into deliveries, one batch per transaction."""
    expanded = 0
    session = new_session(app)
    try:
        with session.begin():
            pending = push_messages.pending_fanouts(session)
        for message_id in pending:
            try:
                while True:
                    with session.begin():
                        count = push_messages.fan_out_batch(
                            session, get_catalog(session), message_id, now or utcnow(),
                            default_timezone=str(app.config["DEFAULT_TIMEZONE"]))
                    expanded += count
                    if count == 0:
                        break
            except Exception as exc:  # one message's failure never stops the others
                _give_up_fan_out(session, message_id, exc, now or utcnow())
    finally:
        session.close()
    return expanded


def _give_up_fan_out(session: Session, message_id: int, exc: Exception, now: datetime
                     ) -> None:
    """A message whose fan-out raised: the batches already expanded are delivered, the rest
    is given up (the message would otherwise fail again at every run, ahead of the others).
    Logged by type only: the text may quote personal data."""
    log.error("push message %s: fan-out raised %s; given up", message_id, type(exc).__name__)
    with session.begin():
        message = session.get(PushMessage, message_id)
        if message is not None and message.fanned_out_at is None:
            message.fanned_out_at = now


def _send(web: WebPushSender, item: push_messages.Outgoing) -> PushOutcome | Exception:
    try:
        return web.send(item.subscription, item.payload, ttl=item.ttl, urgency=item.urgency,
                        topic=item.topic)
    except Exception as exc:  # options refused, or anything else: this delivery's failure
        return exc


def _prepare(session: Session, chunk: list[int], now: datetime) -> list[push_messages.Outgoing]:
    """``prepare`` for a chunk; when it raises, row by row, failing the rows that raise."""
    try:
        with session.begin():
            return push_messages.prepare(session, chunk, now)
    except Exception:
        pass
    out: list[push_messages.Outgoing] = []
    for delivery_id in chunk:
        try:
            with session.begin():
                out.extend(push_messages.prepare(session, [delivery_id], now))
        except Exception as exc:
            log.error("push delivery %s: preparing raised %s; failed", delivery_id,
                      type(exc).__name__)
            with session.begin():
                push_messages.fail(session, delivery_id, "error",
                                   "The message could not be prepared.")
    return out


def deliver(app: Flask, now: datetime | None = None) -> dict[str, int]:
    """Claim due deliveries, send them, record each outcome. Returns counts by new status."""
    try:
        web = sender(app)
    except PushUnavailable:
        return {}
    rules = policy(app)
    results: dict[str, int] = {}
    session = new_session(app)
    try:
        with session.begin():
            claimed = push_messages.claim_due(session, now or utcnow(), rules)
        for start in range(0, len(claimed), SEND_CHUNK):
            chunk = claimed[start:start + SEND_CHUNK]
            outgoing = _prepare(session, chunk, now or utcnow())
            with ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="webpush") as pool:
                outcomes = list(pool.map(lambda item: _send(web, item), outgoing))
            with session.begin():
                for item, outcome in zip(outgoing, outcomes, strict=True):
                    if isinstance(outcome, (InvalidPushOptions, PayloadTooLarge)):
                        push_messages.fail(session, item.delivery_id, "invalid_options",
                                           str(outcome))
                        status = "failed"
                    elif isinstance(outcome, Exception):
                        log.error("push delivery %s: sending raised %s; failed",
                                  item.delivery_id, type(outcome).__name__)
                        push_messages.fail(session, item.delivery_id, "error",
                                           "The push could not be sent.")
                        status = "failed"
                    else:
                        if outcome.status == "config_error":
                            log.error("push service refused our request (%s %s): check the "
                                      "VAPID key and subject", outcome.http_status,
                                      outcome.detail[:200])
                        status = push_messages.record_outcome(
                            session, item.delivery_id, outcome, now or utcnow(), rules)
                    results[status] = results.get(status, 0) + 1
    finally:
        session.close()
    return results


def install(app: App) -> None:
    """Register the worker jobs (once per process; every app shares the registry)."""
    from portal.outbox.worker import JOBS, Job

    every = float(app.config["PUSH_POLL_SECONDS"])
    JOBS.setdefault("push.fan_out", Job("push.fan_out", every, fan_out))
    JOBS.setdefault("push.deliver", Job("push.deliver", every, deliver))
