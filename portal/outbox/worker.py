"""The background worker: ``flask --app app worker``.

A small registry of periodic jobs run by one loop. Aggregates plug in with :func:`periodic`
(wallet pass pushes, web push fan-out...) from their own ``init_app``; each job receives the
app and opens its own sessions. Jobs that must not run twice at once across several workers
claim rows (``FOR UPDATE SKIP LOCKED`` leases, as webhook delivery does), so running more
worker processes adds throughput instead of duplicates.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from flask import Flask

log = logging.getLogger("carnet.worker")


@dataclass
class Job:
    name: str
    every: float  # seconds between the end of one run and the start of the next
    run: Callable[[Flask], object]
    next_at: float = 0.0


JOBS: dict[str, Job] = {}


def periodic(name: str, every: float) -> Callable[[Callable[[Flask], object]],
                                                  Callable[[Flask], object]]:
    """Register ``fn(app)`` to run every ``every`` seconds in the worker."""
    def register(fn: Callable[[Flask], object]) -> Callable[[Flask], object]:
        JOBS[name] = Job(name, every, fn)
        return fn
    return register


@contextmanager
def contained(job: str, row_id: object) -> Iterator[None]:
    """Run one row's work of a job; an exception is logged (the job, the row's id and the
    exception's type: never its text, which may quote personal data) and swallowed, so the
    loop goes on with the next row. The job itself records the row as failed or due again
    where it can; this is the last line, for failures while doing even that."""
    try:
        yield
    except Exception as exc:
        log.error("job %s: row %s failed with %s; going on with the others", job, row_id,
                  type(exc).__name__)


def run_once(app: Flask, names: list[str] | None = None) -> dict[str, object]:
    """Run every job (or the named ones) once, now; what each returned. Tests use this."""
    results: dict[str, object] = {}
    for job in list(JOBS.values()):
        if names is None or job.name in names:
            results[job.name] = job.run(app)
    return results


def run_forever(app: Flask, stop: threading.Event | None = None) -> None:
    """Run due jobs until SIGTERM/SIGINT (or ``stop``); a failing job is logged and retried
    at its next period, it never stops the others."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("worker started with jobs: %s", ", ".join(sorted(JOBS)))
    while not stop.is_set():
        now = time.monotonic()
        for job in list(JOBS.values()):
            if job.next_at <= now:
                try:
                    job.run(app)
                except Exception:
                    log.exception("job %s failed", job.name)
                job.next_at = time.monotonic() + job.every
        wake = min((j.next_at for j in JOBS.values()), default=time.monotonic() + 1)
        stop.wait(max(0.05, wake - time.monotonic()))
    log.info("worker stopped")


# --- webhook delivery ----------------------------------------------------------------------------


def webhook_policy(app: Flask) -> object:
    from portal.services.webhooks import Policy

    return Policy(
        base_seconds=float(app.config["WEBHOOK_RETRY_BASE_SECONDS"]),
        disable_after=timedelta(hours=float(app.config["WEBHOOK_DISABLE_AFTER_HOURS"])),
        max_attempts=int(app.config["WEBHOOK_MAX_ATTEMPTS"]),
        timeout_seconds=float(app.config["WEBHOOK_TIMEOUT_SECONDS"]),
        allow_private=bool(app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"]),
    )


def deliver_webhooks(app: Flask) -> int:
    """Lease due endpoints, deliver each in order. Returns the number of changes sent."""
    import httpx

    from portal.core.db import begin_write, new_session, utcnow
    from portal.services import webhooks

    policy = webhook_policy(app)
    assert isinstance(policy, webhooks.Policy)
    session = new_session(app)
    with begin_write(session):
        claimed = webhooks.claim_due(session, utcnow(), policy)
    session.close()
    sent = 0
    # trust_env=False: a proxy from the environment would make the connection, not us, and
    # pinning the checked address would mean nothing.
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for hook_id in claimed:
            with contained("webhooks.deliver", hook_id):
                sent += webhooks.deliver_endpoint(lambda: new_session(app), client, hook_id,
                                                  policy)
    return sent


def prune_deliveries(app: Flask) -> int:
    from portal.core.db import new_session, utcnow
    from portal.services import webhooks

    session = new_session(app)
    with session.begin():
        removed = webhooks.prune(session, utcnow() - timedelta(
            days=int(app.config["WEBHOOK_LOG_DAYS"])))
    session.close()
    return removed


def purge_idempotency_keys(app: Flask) -> int:
    """Forget Idempotency-Key answers older than ``IDEMPOTENCY_KEEP_DAYS``: clients retry
    within minutes; the table would otherwise grow with every accrual."""
    from portal.core.db import new_session, utcnow
    from portal.services import idempotency

    session = new_session(app)
    with session.begin():
        removed = idempotency.purge(session, utcnow() - timedelta(
            days=int(app.config["IDEMPOTENCY_KEEP_DAYS"])))
    session.close()
    return removed


def purge_sessions(app: Flask) -> int:
    """Forget sessions that ended by themselves (idle or too old)."""
    from portal.core.db import new_session
    from portal.services import sign_ins

    limits = sign_ins.limits_from(app.config, app.permanent_session_lifetime)
    session = new_session(app)
    with session.begin():
        removed = sign_ins.purge(session, limits)
    session.close()
    return removed


def init_app(app: Flask) -> None:
    JOBS.setdefault("webhooks.deliver", Job("webhooks.deliver",
                                            float(app.config["WEBHOOK_POLL_SECONDS"]),
                                            deliver_webhooks))
    JOBS.setdefault("webhooks.prune", Job("webhooks.prune", 3600.0, prune_deliveries))
    JOBS.setdefault("sessions.purge", Job("sessions.purge", 3600.0, purge_sessions))
    JOBS.setdefault("idempotency.purge", Job("idempotency.purge", 3600.0,
                                             purge_idempotency_keys))
