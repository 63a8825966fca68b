"""Web push messages from sending systems: checked and stored, fanned out to the subscriptions
:func:`decide` allows, then delivered by the worker.

The life of a message: the API stores a :class:`PushMessage` (everything that could make a
push service refuse it, such as the payload size, is checked first). The worker expands it in
batches of subscriptions into :class:`PushDelivery` rows, queued or skipped with the reason
the precedence gave; a cursor on the message makes the fan-out resumable. Queued deliveries
are claimed with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), sent outside any
transaction, and their outcome recorded. A worker killed mid-way leaves its rows queued; they
are claimed again when the lease runs out, so a message may be sent twice, never lost.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.consent import Dispatch
from portal.models.customer import Customer
from portal.push import subscriptions as push
from portal.push.models import PushDelivery, PushMessage, PushSubscription
from portal.push.webpush import MAX_PAYLOAD_BYTES, PushOutcome
from portal.services.catalog import Catalog
from portal.services.decisions import Decision, decide, load_facts
from portal.services.privacy import PrivacyHooks

SENDER = "carnet-web-push"
TEXT_FIELDS = ("title", "body", "url", "icon")


class MessageError(ValueError):
    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 30.0
    max_delay_seconds: float = 3600.0
    max_attempts: int = 8
    lease_seconds: float = 120.0

    def delay(self, attempts: int) -> timedelta:
        ceiling = min(self.max_delay_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return timedelta(seconds=ceiling / 2 + random.uniform(0, ceiling / 2))


# --- the message ------------------------------------------------------------------------------


def variant(message: PushMessage, locale: str | None) -> dict[str, str | None]:
    """The texts for one recipient: their language's variant, field by field over the
    defaults (``fr_CA`` falls back to ``fr``)."""
    chosen: Mapping[str, str] = {}
    localized = message.localized or {}
    if locale:
        chosen = localized.get(locale) or localized.get(locale.split("_")[0].split("-")[0]) or {}
    base = {"title": message.title, "body": message.body, "url": message.url,
            "icon": message.icon}
    return {name: chosen.get(name) or base[name] for name in TEXT_FIELDS}


def payload(message: PushMessage, locale: str | None) -> bytes:
    """What the service worker receives: small JSON, the message id for its beacons."""
    texts = variant(message, locale)
    data: dict[str, Any] = {"id": message.public_id, "title": texts["title"],
                            "body": texts["body"]}
    for name in ("url", "icon"):
        if texts[name]:
            data[name] = texts[name]
    if message.collapse_topic:
        data["tag"] = message.collapse_topic
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def create_message(
    session: Session, catalog: Catalog, data: Mapping[str, Any], *, api_key_id: int | None,
    now: datetime | None = None,
) -> PushMessage:
    """Check and store a message; nothing is queued until the fan-out. Every language variant
    must fit one RFC 8291 record: a refusal now beats thousands of 413s later."""
    topic = catalog.get(data["topic"])
    if topic is None:
        raise MessageError("unknown_topic", "topic", f"no topic '{data['topic']}'")
    if push.CHANNEL not in topic.channels:
        raise MessageError("channel_not_offered", "topic",
                           f"'{topic.key}' is not offered by browser notification")
    audience = data["audience"]
    stored_audience: Any
    unreachable = 0
    if audience == "all":
        stored_audience = "all"
    elif isinstance(audience, Mapping) and isinstance(audience.get("customers"), list):
        from portal.services import identity

        public_ids = [str(x) for x in audience["customers"]]
        found = identity.resolve_many(session, [{"id": p} for p in public_ids])
        missing = [i for i, c in enumerate(found) if c is None]
        if missing:
            raise MessageError("unknown_customer", f"audience.customers[{missing[0]}]",
                               f"no customer '{public_ids[missing[0]][:40]}'"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        ids = sorted({c.id for c in found if c is not None})
        reachable = set(push.resolve_contacts(session, [c for c in found if c is not None]))
        unreachable = len(set(ids) - reachable)
        stored_audience = {"customers": public_ids, "ids": ids}
    else:
        raise MessageError("invalid_audience", "audience",
                           'audience is "all" or {"customers": [ids]}')
    message = PushMessage(
        public_id="pm_" + secrets.token_urlsafe(12), topic_key=topic.key,
        audience=stored_audience, title=data["title"], body=data.get("body") or "",
        url=data.get("url"), icon=data.get("icon"), localized=dict(data.get("localized") or {}),
        ttl=data.get("ttl", 86400), urgency=data.get("urgency") or "normal",
        collapse_topic=data.get("collapse_topic"), api_key_id=api_key_id,
        created_at=now or utcnow(), fanout_cursor=0, unreachable=unreachable,
    )
    for locale in [None, *message.localized]:
        size = len(payload(message, locale))
        if size > MAX_PAYLOAD_BYTES:
            raise MessageError(
                "payload_too_large", f"localized.{locale}" if locale else "body",
                f"the notification is {size} bytes once encoded; at most {MAX_PAYLOAD_BYTES} "
                "fit in one encrypted push record")
    session.add(message)
    session.flush()
    return message


def find(session: Session, public_id: str) -> PushMessage | None:
    return session.scalars(select(PushMessage).where(PushMessage.public_id == public_id)).first()


def summary(session: Session, message: PushMessage) -> dict[str, Any]:
    counts = {status: 0 for status in ("queued", "sent", "failed", "expired", "skipped")}
    for status, count in session.execute(
        select(PushDelivery.status, func.count()).where(PushDelivery.message_id == message.id)
        .group_by(PushDelivery.status)
    ):
        counts[status] = int(count)
    displayed, clicked = session.execute(
        select(func.count(PushDelivery.displayed_at), func.count(PushDelivery.clicked_at))
        .where(PushDelivery.message_id == message.id)).one()
    skipped_reasons = {
        str(reason): int(count) for reason, count in session.execute(
            select(PushDelivery.reason, func.count()).where(
                PushDelivery.message_id == message.id, PushDelivery.status == "skipped")
            .group_by(PushDelivery.reason))
    }
    if message.fanned_out_at is None:
        state = "fanning_out"
    else:
        state = "sending" if counts["queued"] else "done"
    return {
        "id": message.public_id, "topic": message.topic_key, "status": state,
        "created_at": message.created_at.isoformat(),
        "counts": {**counts, "displayed": int(displayed), "clicked": int(clicked),
                   "unreachable": message.unreachable},
        "skipped_reasons": skipped_reasons,
    }


# --- fan-out ----------------------------------------------------------------------------------


def pending_fanouts(session: Session, limit: int = 20) -> list[int]:
    return list(session.scalars(select(PushMessage.id).where(PushMessage.fanned_out_at.is_(None))
                                .order_by(PushMessage.id).limit(limit)))


def fan_out_batch(
    session: Session, catalog: Catalog, message_id: int, now: datetime, *, batch: int = 500,
    default_timezone: str = "UTC",
) -> int:
    """Expand the next batch of subscriptions into deliveries; 0 when the fan-out is done.

    The message row is locked so two workers never expand the same batch; the cursor moves in
    the same transaction as the rows it covers.
    """
    message = session.scalars(select(PushMessage).where(PushMessage.id == message_id)
                              .with_for_update(skip_locked=True)).first()
    if message is None or message.fanned_out_at is not None:
        return 0
    query = select(PushSubscription).where(PushSubscription.id > message.fanout_cursor,
                                           PushSubscription.expired_at.is_(None))
    if message.audience != "all":
        query = query.where(PushSubscription.customer_id.in_(message.audience.get("ids", [])))
    subs = list(session.scalars(query.order_by(PushSubscription.id).limit(batch)))
    topic = catalog.get(message.topic_key)
    decisions: dict[int, Decision] = {}
    owned = [s for s in subs if s.customer_id is not None]
    if owned:
        customers = list(session.scalars(select(Customer).where(
            Customer.id.in_({s.customer_id for s in owned}))))
        facts = load_facts(session, customers, [(message.topic_key, push.CHANNEL)], now,
                           default_timezone=default_timezone)
        by_customer = {
            c.id: decide(topic, push.CHANNEL, facts.get((c.id, message.topic_key, push.CHANNEL)),
                         now)
            for c in customers
        }
        decisions.update({s.id: by_customer[s.customer_id] for s in owned
                          if s.customer_id in by_customer})
    anonymous = [s for s in subs if s.customer_id is None]
    for sid, facts_ in push.device_facts(session, anonymous, message.topic_key).items():
        decisions[sid] = decide(topic, push.CHANNEL, facts_, now)
    for sub in subs:
        decision = decisions.get(sub.id)
        row = PushDelivery(message_id=message.id, subscription_id=sub.id,
                           customer_id=sub.customer_id, attempts=0, next_attempt_at=now)
        if decision is None or decision.decision == "deny":
            row.status, row.reason = "skipped", decision.reason if decision else "unknown"
        elif decision.decision == "defer":
            row.status, row.reason = "queued", decision.reason
            row.next_attempt_at = decision.next_allowed_at or now
        else:
            row.status = "queued"
        session.add(row)
    if subs:
        message.fanout_cursor = subs[-1].id
    if len(subs) < batch:
        message.fanned_out_at = now
    session.flush()
    return len(subs)


# --- delivery ---------------------------------------------------------------------------------


def claim_due(session: Session, now: datetime, policy: RetryPolicy,
              limit: int = 200) -> list[int]:
    """Lease due deliveries; ``SKIP LOCKED`` lets several workers share them on PostgreSQL."""
    ids = list(session.scalars(
        select(PushDelivery.id).where(
            PushDelivery.status == "queued", PushDelivery.next_attempt_at <= now,
            (PushDelivery.leased_until.is_(None)) | (PushDelivery.leased_until < now),
        ).order_by(PushDelivery.next_attempt_at, PushDelivery.id).limit(limit)
        .with_for_update(skip_locked=True)))
    if ids:
        session.execute(update(PushDelivery).where(PushDelivery.id.in_(ids)).values(
            leased_until=now + timedelta(seconds=policy.lease_seconds)))
    return ids


@dataclass(frozen=True)
class Outgoing:
    delivery_id: int
    subscription: dict[str, Any]
    payload: bytes
    ttl: int
    urgency: str
    topic: str | None


def prepare(session: Session, delivery_ids: list[int], now: datetime) -> list[Outgoing]:
    """What to send for the claimed rows. Rows whose subscription expired meanwhile become
    ``expired``; rows whose message outlived its TTL while waiting become ``failed``."""
    if not delivery_ids:
        return []
    rows = session.execute(
        select(PushDelivery, PushSubscription, PushMessage)
        .join(PushSubscription, PushSubscription.id == PushDelivery.subscription_id)
        .join(PushMessage, PushMessage.id == PushDelivery.message_id)
        .where(PushDelivery.id.in_(delivery_ids)).order_by(PushDelivery.id)).all()
    customer_ids = {sub.customer_id for _, sub, _ in rows if sub.customer_id}
    locales: dict[int, str | None] = {
        cid: loc for cid, loc in session.execute(
            select(Customer.id, Customer.locale).where(Customer.id.in_(customer_ids)))
    } if customer_ids else {}
    out: list[Outgoing] = []
    for delivery, sub, message in rows:
        if sub.expired_at is not None:
            delivery.status, delivery.reason = "expired", sub.expired_reason or "expired"
            delivery.leased_until = None
            continue
        remaining = message.ttl - int((now - message.created_at).total_seconds())
        if message.ttl > 0 and remaining <= 0:
            delivery.status, delivery.reason = "failed", "ttl_elapsed"
            delivery.leased_until = None
            continue
        locale = locales.get(sub.customer_id) if sub.customer_id else None
        out.append(Outgoing(
            delivery.id,
            {"endpoint": sub.endpoint, "keys": {"p256dh": sub.p256dh, "auth": sub.auth}},
            payload(message, locale or sub.locale), max(0, remaining), message.urgency,
            message.collapse_topic))
    return out


def record_outcome(session: Session, delivery_id: int, outcome: PushOutcome, now: datetime,
                   policy: RetryPolicy) -> str:
    """Apply one push service answer; returns the delivery's new status."""
    delivery = session.get(PushDelivery, delivery_id)
    if delivery is None:
        return "missing"
    delivery.attempts += 1
    delivery.leased_until = None
    delivery.http_status = outcome.http_status
    delivery.error = outcome.detail[:300] if outcome.status != "sent" else None
    if outcome.status == "sent":
        delivery.status, delivery.sent_at, delivery.reason = "sent", now, None
        _count_dispatch(session, delivery, now)
    elif outcome.should_deactivate:
        delivery.status, delivery.reason = "expired", outcome.status
        push.expire_endpoint(session, outcome.endpoint, outcome.status, now)
    elif outcome.status in ("rate_limited", "retry"):
        if delivery.attempts >= policy.max_attempts:
            delivery.status, delivery.reason = "failed", f"gave_up_{outcome.status}"
        else:
            wait = (timedelta(seconds=outcome.retry_after) if outcome.retry_after is not None
                    else policy.delay(delivery.attempts))
            delivery.status, delivery.reason = "queued", outcome.status
            delivery.next_attempt_at = now + wait
    else:  # too_large, config_error
        delivery.status, delivery.reason = "failed", outcome.status
    return delivery.status


def fail(session: Session, delivery_id: int, reason: str, detail: str) -> None:
    """A caller-side mistake found while sending (options a push service would refuse)."""
    delivery = session.get(PushDelivery, delivery_id)
    if delivery is not None:
        delivery.status, delivery.reason, delivery.error = "failed", reason, detail[:300]
        delivery.leased_until = None


def _count_dispatch(session: Session, delivery: PushDelivery, now: datetime) -> None:
    """One dispatch per customer and message, so the weekly cap counts web push like any
    sender's reports (several browsers of one person are one contact)."""
    if delivery.customer_id is None:
        return
    message = session.get(PushMessage, delivery.message_id)
    assert message is not None
    exists = session.scalars(select(Dispatch.id).where(
        Dispatch.customer_id == delivery.customer_id, Dispatch.channel == push.CHANNEL,
        Dispatch.message_id == message.public_id)).first()
    if exists is None:
        session.add(Dispatch(customer_id=delivery.customer_id, topic_key=message.topic_key,
                             channel=push.CHANNEL, sent_at=now, sender=SENDER,
                             message_id=message.public_id))


# --- beacons ----------------------------------------------------------------------------------


def record_beacon(session: Session, message_public_id: str, endpoint_hash: str, kind: str,
                  now: datetime) -> bool:
    """A service worker showed the notification, or the person clicked it. A click implies a
    display (some browsers skip the display beacon when the worker is short-lived)."""
    row = session.execute(
        select(PushDelivery)
        .join(PushMessage, PushMessage.id == PushDelivery.message_id)
        .join(PushSubscription, PushSubscription.id == PushDelivery.subscription_id)
        .where(PushMessage.public_id == message_public_id,
               PushSubscription.endpoint_hash == endpoint_hash)).scalars().first()
    if row is None or row.status != "sent":
        return False
    row.displayed_at = row.displayed_at or now
    if kind == "clicked":
        row.clicked_at = row.clicked_at or now
    return True



# --- privacy ---------------------------------------------------------------------------------

EXPORT_NAME = "web_push_messages"


def _own_deliveries(customer: Customer) -> Any:
    return select(PushDelivery.id).join(
        PushSubscription, PushSubscription.id == PushDelivery.subscription_id).where(
        PushSubscription.customer_id == customer.id)


def export_deliveries(session: Session, customer: Customer) -> list[dict[str, Any]]:
    """The notifications sent (or meant) to the customer's browsers, and what became of them."""
    rows = session.execute(
        select(PushDelivery, PushMessage, PushSubscription.public_id)
        .join(PushMessage, PushMessage.id == PushDelivery.message_id)
        .join(PushSubscription, PushSubscription.id == PushDelivery.subscription_id)
        .where(PushDelivery.id.in_(_own_deliveries(customer))).order_by(PushDelivery.id))
    return [
        {"message": message.public_id, "topic": message.topic_key, "title": message.title,
         "subscription": subscription, "status": delivery.status, "reason": delivery.reason,
         "sent_at": _iso(delivery.sent_at), "displayed_at": _iso(delivery.displayed_at),
         "clicked_at": _iso(delivery.clicked_at)}
        for delivery, message, subscription in rows
    ]


def erase_deliveries(session: Session, customer: Customer) -> None:
    """Nothing more is sent: queued deliveries end now rather than when a worker claims them.
    The rows stay, pseudonymous, in the message's counts."""
    session.execute(
        update(PushDelivery).where(PushDelivery.id.in_(_own_deliveries(customer)),
                                   PushDelivery.status == "queued")
        .values(status="expired", reason="erased", leased_until=None)
        .execution_options(synchronize_session=False))


def register_privacy(hooks: PrivacyHooks) -> None:
    hooks.add_exporter(EXPORT_NAME, export_deliveries)
    hooks.add_eraser(EXPORT_NAME, erase_deliveries)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
