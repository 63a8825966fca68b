"""Worker jobs that keep Apple Wallet cards current: follow the change feed, send the pushes."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from portal.core.db import new_session
from portal.services import wallet_apple_sync as sync
from portal.wallet_ws.issuer import apple_wallet

log = logging.getLogger("carnet.wallet.apple")

#: Batches read from the feed per run at most, so one run never holds the worker for long.
MAX_FEED_BATCHES = 20


def follow_feed(app: Flask) -> int:
    """Advance the cards' update tags for the changes written since the last run."""
    notified = 0
    for _ in range(MAX_FEED_BATCHES):
        session = new_session(app)
        try:
            with session.begin():
                step = sync.follow_changes(session)
        finally:
            session.close()
        notified += step.notified
        if not step.moved:
            break
    return notified


def send_pushes(app: Flask, policy: sync.PushPolicy | None = None) -> dict[str, Any]:
    """Claim due pushes, send them through APNs, record the outcomes (in that order)."""
    policy = policy or sync.PushPolicy()
    wallet = apple_wallet(app)
    if not wallet.can_push:
        return {"skipped": "no APNs key configured"}
    session = new_session(app)
    try:
        with session.begin():
            claimed = sync.claim_pushes(session, policy)
    finally:
        session.close()
    if not claimed:
        return {"sent": 0}
    results = wallet.apns().send([push.push_token for push in claimed])
    session = new_session(app)
    try:
        with session.begin():
            summary = sync.record_push_results(session, claimed, results, policy)
    finally:
        session.close()
    if summary.unregistered or summary.retrying or summary.dropped:
        log.info("apple pushes: %s", summary)
    return {"sent": len(claimed), **vars(summary)}
