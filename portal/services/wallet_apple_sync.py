"""Keeping Apple Wallet cards current: following the change feed, and the outbox of update
pushes the worker sends through APNs.

**Following.** Points, tiers and the member's address live in other aggregates. Their
services already write every change to the feed (``changes``) in the same transaction, so
the cards follow the feed with a persisted cursor (:func:`follow_changes`) rather than
hooking into the ledger's write path: the ledger pays nothing for wallet cards, a worker that
stops mid-way resumes from its cursor, and the cursor moves in the same transaction as the
card updates it caused, so a change is acted on once.

**Pushing.** :func:`notify_pass_changed` leaves one ``wallet_apple_pushes`` row per device.
The worker claims due rows with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), sends
outside any transaction, then records the outcomes: delivered rows are deleted (only if no
newer update re-armed them meanwhile), gone devices are unregistered, the rest back off
exponentially. A worker killed after sending and before recording leaves the lease to expire
and the push is sent again, which costs the device one more "nothing changed" request.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.delivery.apns import PushOutcome, PushResult
from portal.loyalty.models import Member
from portal.models.google_wallet import WalletFeedCursor
from portal.models.wallet import AppleDeviceRegistration, ApplePass, ApplePush
from portal.outbox import feed
from portal.services.wallet_apple import FEED_CONSUMER, notify_pass_changed

log = logging.getLogger("carnet.wallet.apple")

#: Changes that alter what a card shows, with the customer fields that matter for updates.
FOLLOWED_TYPES: Final = (
    "loyalty.points_changed", "loyalty.tier_changed", "loyalty.enrolled", "loyalty.left",
    "customer.updated", "customer.erased", "customer.merged",
)
_PRINTED_CUSTOMER_FIELDS: Final = frozenset({"email", "name"})


def _touches_card(change_type: str, data: Any) -> bool:
    """Whether the change alters what the card shows. A change whose data this code cannot
    read counts as touching the card: a needless update costs a download, a stuck cursor
    would stop every card's updates."""
    if change_type != "customer.updated":
        return True
    try:
        return bool(_PRINTED_CUSTOMER_FIELDS.intersection(data.get("fields") or []))
    except (AttributeError, TypeError):
        return True


@dataclass(frozen=True)
class Followed:
    moved: bool  # the cursor advanced: there may be more to read
    notified: int  # cards whose update tag advanced


def follow_changes(session: Session, limit: int = 500) -> Followed:
    """Read the next changes after the consumer's cursor and notify the cards they alter, in
    one transaction with the cursor move: a crash either does both or neither.

    Several workers may run this: on PostgreSQL the
    cursor row is locked with ``SKIP LOCKED`` and a second worker simply does nothing.
    """
    row = session.scalars(
        select(WalletFeedCursor)
        .where(WalletFeedCursor.consumer == FEED_CONSUMER)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).first()
    if row is None:  # no card issued yet, or another worker holds the cursor
        return Followed(False, 0)
    after = feed.Cursor(row.cursor_txid, row.cursor_id)
    found, cursor = feed.read(session, after, limit, types=list(FOLLOWED_TYPES))
    customer_ids = {
        c.customer_id for c in found if c.customer_id and _touches_card(c.type, c.data or {})
    }
    notified = 0
    if customer_ids:
        members = list(session.scalars(
            select(Member)
            .join(ApplePass, ApplePass.member_id == Member.id)
            .where(Member.customer_id.in_(customer_ids))
            .order_by(Member.id)
        ))
        for member in members:
            try:
                with session.begin_nested():
                    changed = notify_pass_changed(session, member, "change feed")
            except Exception as exc:  # one card's failure never holds the cursor back
                log.error("apple card of member %s: update raised %s; skipped", member.id,
                          type(exc).__name__)
                continue
            if changed is not None:
                notified += 1
    if cursor != after:
        row.cursor_txid, row.cursor_id = cursor.txid, cursor.id
        row.updated_at = utcnow()
    return Followed(cursor != after, notified)


# --- the push outbox ---------------------------------------------------------------------------

#: APNs answers that mean the token will never work again for this card.
_DEAD_TOKEN_REASONS: Final = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})


@dataclass(frozen=True)
class PushPolicy:
    """Exponential backoff with jitter; a push still failing after ``max_attempts`` is
    dropped (the device also refreshes its cards on its own)."""

    base_seconds: float = 30.0
    max_delay_seconds: float = 3600.0
    max_attempts: int = 25
    lease_seconds: float = 300.0
    batch: int = 500

    def delay(self, failures: int) -> timedelta:
        ceiling = min(self.max_delay_seconds, self.base_seconds * 2 ** max(0, failures - 1))
        return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))


@dataclass(frozen=True)
class ClaimedPush:
    id: int
    registration_id: int
    push_token: str
    tag: int


@dataclass
class PushSummary:
    delivered: int = 0
    unregistered: int = 0
    retrying: int = 0
    dropped: int = 0


def claim_pushes(session: Session, policy: PushPolicy, now: datetime | None = None
                 ) -> list[ClaimedPush]:
    """Lease the pushes that are due. Commit before sending: the lease, not a held lock,
    keeps other workers away while APNs is being called."""
    now = now or utcnow()
    rows = session.execute(
        select(ApplePush.id, ApplePush.registration_id, AppleDeviceRegistration.push_token,
               ApplePush.tag)
        .join(AppleDeviceRegistration, AppleDeviceRegistration.id == ApplePush.registration_id)
        .where(ApplePush.next_attempt_at <= now,
               or_(ApplePush.leased_until.is_(None), ApplePush.leased_until < now))
        .order_by(ApplePush.next_attempt_at, ApplePush.id)
        .limit(policy.batch)
        .with_for_update(skip_locked=True, of=ApplePush)
    ).all()
    claimed = [ClaimedPush(int(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]
    if claimed:
        session.execute(
            update(ApplePush).where(ApplePush.id.in_([c.id for c in claimed]))
            .values(leased_until=now + timedelta(seconds=policy.lease_seconds))
            .execution_options(synchronize_session=False)
        )
    return claimed


def record_push_results(session: Session, claimed: Sequence[ClaimedPush],
                        results: Sequence[PushResult], policy: PushPolicy,
                        now: datetime | None = None) -> PushSummary:
    """Apply APNs' answers to the claimed pushes (same order as ``claimed``)."""
    now = now or utcnow()
    summary = PushSummary()
    for push, result in zip(claimed, results, strict=True):
        if result.outcome is PushOutcome.DELIVERED:
            _delivered(session, push)
            summary.delivered += 1
        elif result.outcome is PushOutcome.GONE or result.reason in _DEAD_TOKEN_REASONS:
            # Only the registration that still has this token: the device may have
            # registered again with a new one since the claim.
            session.execute(delete(ApplePush).where(ApplePush.id == push.id))
            session.execute(delete(AppleDeviceRegistration).where(
                AppleDeviceRegistration.id == push.registration_id,
                AppleDeviceRegistration.push_token == push.push_token))
            summary.unregistered += 1
        elif _retry_later(session, push, result, policy, now):
            summary.retrying += 1
        else:
            summary.dropped += 1
    return summary


def _delivered(session: Session, push: ClaimedPush) -> None:
    done = session.execute(delete(ApplePush).where(ApplePush.id == push.id,
                                                   ApplePush.tag == push.tag))
    if not getattr(done, "rowcount", 0):
        # A newer update re-armed the row while we were sending: send it again now.
        session.execute(update(ApplePush).where(ApplePush.id == push.id)
                        .values(leased_until=None)
                        .execution_options(synchronize_session=False))


def _retry_later(session: Session, push: ClaimedPush, result: PushResult,
                 policy: PushPolicy, now: datetime) -> bool:
    row = session.get(ApplePush, push.id, populate_existing=True)
    if row is None:
        return False
    attempts = row.attempts + 1
    error = f"{result.status or '-'} {result.reason or result.outcome.value}"[:200]
    if attempts >= policy.max_attempts:
        log.warning("dropping an Apple pass push after %d attempts: %s", attempts, error)
        session.delete(row)
        session.flush()
        return False
    delay = policy.delay(attempts)
    if result.retry_after is not None:
        delay = max(delay, timedelta(seconds=min(result.retry_after, policy.max_delay_seconds)))
    row.attempts = attempts
    row.next_attempt_at = now + delay
    row.leased_until = None
    row.last_error = error
    session.flush()
    return True


def pending_pushes(session: Session, apple_pass: ApplePass) -> list[ApplePush]:
    """The pushes still owed to the card's devices (for tests and support)."""
    return list(session.scalars(
        select(ApplePush).join(AppleDeviceRegistration,
                               AppleDeviceRegistration.id == ApplePush.registration_id)
        .where(AppleDeviceRegistration.pass_id == apple_pass.id).order_by(ApplePush.id)
        .execution_options(populate_existing=True)))
