"""Recording consent: one append-only event per choice, the current state updated in the same
transaction, and a change in the feed. Portal, API, one-click unsubscribe, SMS keywords and
imports all come through :func:`record_consent`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.catalog import CHANNELS
from portal.models.consent import ANY, STATES, ConsentEvent, ConsentProof, ConsentState
from portal.models.customer import Customer
from portal.outbox import changes
from portal.services.catalog import Catalog, get_catalog, wording_exists

SOURCES = ("portal", "link", "one_click", "double_opt_in", "api", "import", "sms", "call_center",
           "store", "paper", "merge", "web_push", "loyalty", "system")


class ConsentError(ValueError):
    """A choice that cannot be recorded; ``field`` names the part at fault."""

    def __init__(self, message: str, field: str, code: str = "invalid_consent") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass(frozen=True)
class Proof:
    """How the choice was made, for GDPR Art. 7 proof."""

    source: str
    actor: str
    ip: str | None = None
    user_agent: str | None = None


def proof_digest(event_time: datetime, proof: Proof) -> str:
    material = "|".join([event_time.isoformat(), proof.ip or "", proof.user_agent or ""])
    return hashlib.sha256(material.encode()).hexdigest()


def lock_customer(session: Session, customer_id: int) -> None:
    """Serialise consent writes per customer so event order is state order (PostgreSQL)."""
    session.execute(select(Customer.id).where(Customer.id == customer_id).with_for_update())


def record_consent(
    session: Session,
    customer: Customer,
    topic_key: str,
    channel: str,
    state: str,
    proof: Proof,
    *,
    catalog: Catalog | None = None,
    wording_version: int | None = None,
    at: datetime | None = None,
) -> ConsentEvent:
    """Append the event, move the current state, emit the change. Never commits."""
    catalog = catalog or get_catalog(session)
    if state not in STATES:
        raise ConsentError(f"state must be one of {', '.join(STATES)}", "state")
    if channel != ANY and channel not in CHANNELS:
        raise ConsentError(f"unknown channel '{channel}'", "channel", "unknown_channel")
    if proof.source not in SOURCES:
        raise ConsentError(f"unknown source '{proof.source}'", "source")
    if customer.erased_at is not None:
        raise ConsentError("this customer was erased", "customer", "erased")
    affected: list[tuple[str, str]]
    if topic_key == ANY:
        if state == "pending":
            raise ConsentError("switches cannot be pending", "state")
        version, digest = catalog.switches_version, catalog.switches_hash
        affected = [(ANY, channel)]
    else:
        topic = catalog.get(topic_key)
        if topic is None:
            raise ConsentError(f"unknown topic '{topic_key}'", "topic", "unknown_topic")
        if channel != ANY and channel not in topic.channels:
            raise ConsentError(f"topic '{topic_key}' is not offered on '{channel}'", "channel",
                               "channel_not_offered")
        if topic.required and state != "granted":
            raise ConsentError(f"'{topic_key}' is required and cannot be switched off", "topic",
                               "required_topic")
        version, digest = topic.wording_version, topic.wording_hash
        if wording_version is not None and wording_version != version:
            shown = wording_exists(session, topic_key, wording_version)
            if shown is None:
                raise ConsentError(f"topic '{topic_key}' has no wording version "
                                   f"{wording_version}", "wording_version", "unknown_wording")
            version, digest = shown.version, shown.hash
        channels = topic.channels if channel == ANY else (channel,)
        affected = [(topic_key, ch) for ch in channels]

    lock_customer(session, customer.id)
    now = at or utcnow()
    event = ConsentEvent(
        customer_id=customer.id, topic_key=topic_key, channel=channel, state=state,
        source=proof.source, actor=proof.actor[:120], wording_version=version,
        wording_hash=digest, proof_digest=proof_digest(now, proof), occurred_at=now,
    )
    session.add(event)
    session.flush()
    session.add(ConsentProof(event_id=event.id, ip=proof.ip,
                             user_agent=(proof.user_agent or "")[:1000] or None))
    current = {
        (s.topic_key, s.channel): s
        for s in session.scalars(
            select(ConsentState).where(
                ConsentState.customer_id == customer.id,
                ConsentState.topic_key == affected[0][0],
                ConsentState.channel.in_([ch for _, ch in affected]),
            )
        )
    }
    for key in affected:
        row = current.get(key)
        if row is None:
            session.add(ConsentState(customer_id=customer.id, topic_key=key[0], channel=key[1],
                                     state=state, event_id=event.id, updated_at=now))
        elif (row.updated_at, row.event_id) < (now, event.id):
            # The most recent choice wins, not the last one written: a back-dated event (an
            # imported paper form) stays in the history without undoing a newer choice.
            row.state, row.event_id, row.updated_at = state, event.id, now
    changes.emit(session, "consent.changed", {
        "customer": customer.public_id, "topic": topic_key, "channel": channel, "state": state,
        "source": proof.source, "event_id": event.id, "wording_version": version,
        "occurred_at": now.isoformat(),
    }, customer.id)
    return event


def current_states(session: Session, customer: Customer) -> dict[tuple[str, str], str]:
    return {
        (s.topic_key, s.channel): s.state
        for s in session.scalars(select(ConsentState).where(ConsentState.customer_id ==
                                                            customer.id))
    }


def history(session: Session, customer_ids: list[int], limit: int = 200) -> list[ConsentEvent]:
    """Newest first; merged records are passed in too so both histories show."""
    return list(
        session.scalars(
            select(ConsentEvent)
            .where(ConsentEvent.customer_id.in_(customer_ids))
            .order_by(ConsentEvent.occurred_at.desc(), ConsentEvent.id.desc())
            .limit(limit)
        )
    )
