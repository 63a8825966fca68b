"""Suppressions (bounces, complaints, SMS STOP) and inbound SMS keywords.

A suppression stops a channel whatever the person chose; it is lifted, never deleted, so the
record of why a channel was blocked survives.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.consent import ANY, Suppression
from portal.models.customer import Customer
from portal.outbox import changes
from portal.services.catalog import Catalog
from portal.services.consent import Proof, record_consent

REASONS = ("hard_bounce", "complaint", "sms_stop", "manual")
# Carrier and regulator keywords; REVOKE and OPT OUT are required alongside the classic ones.
STOP_WORDS = ("STOPALL", "STOP", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT",
              "ARRET")


def to_json(s: Suppression, customer: Customer) -> dict[str, object]:
    return {
        "id": s.id, "customer": customer.public_id, "channel": s.channel, "reason": s.reason,
        "address": s.address, "source": s.source, "created_at": s.created_at.isoformat(),
        "lifted_at": s.lifted_at.isoformat() if s.lifted_at else None,
    }


def add(session: Session, customer: Customer, channel: str, reason: str,
        address: str | None, source: str = "api") -> Suppression:
    """Suppress ``channel``; an identical active suppression is returned, not duplicated."""
    existing = session.scalars(select(Suppression).where(
        Suppression.customer_id == customer.id, Suppression.channel == channel,
        Suppression.reason == reason, Suppression.lifted_at.is_(None))).first()
    if existing is not None:
        return existing
    row = Suppression(customer_id=customer.id, channel=channel, reason=reason,
                      address=address, source=source, created_at=utcnow())
    session.add(row)
    session.flush()
    changes.emit(session, "suppression.added", {
        "customer": customer.public_id, "suppression": row.id, "channel": channel,
        "reason": reason}, customer.id)
    return row


def lift(session: Session, suppression: Suppression, customer: Customer) -> Suppression:
    if suppression.lifted_at is None:
        suppression.lifted_at = utcnow()
        changes.emit(session, "suppression.lifted", {
            "customer": customer.public_id, "suppression": suppression.id,
            "channel": suppression.channel, "reason": suppression.reason}, customer.id)
    return suppression


def active_for(session: Session, customer_ids: list[int]) -> list[Suppression]:
    return list(session.scalars(select(Suppression).where(
        Suppression.customer_id.in_(customer_ids), Suppression.lifted_at.is_(None))
        .order_by(Suppression.id)))


def stop_keyword(body: str) -> str | None:
    """The STOP keyword a message is, or starts with (case, accents and spaces ignored)."""
    folded = unicodedata.normalize("NFKD", body)
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch)).upper()
    words = re.findall(r"[A-Z]+", folded)
    if not words:
        return None
    first = words[0]
    if first == "OPT" and len(words) > 1 and words[1] == "OUT":
        return "OPT OUT"
    if first in STOP_WORDS:
        return first
    return None


@dataclass(frozen=True)
class InboundResult:
    understood: str | None  # the keyword, or None
    customer: Customer | None
    action: str  # "withdrawn_sms" | "ignored" | "unknown_sender"


def inbound_sms(session: Session, catalog: Catalog, customer: Customer | None,
                sender: str, body: str) -> InboundResult:
    """Honour a STOP-like reply: every SMS message stops, as a provable consent event."""
    keyword = stop_keyword(body)
    if keyword is None:
        return InboundResult(None, customer, "ignored")
    if customer is None:
        return InboundResult(keyword, None, "unknown_sender")
    if customer.erased_at is None:
        # The sending number is personal data: it goes to the proof's erasable part (the
        # append-only ledger keeps only "the person replied by SMS" and the proof's digest).
        record_consent(session, customer, ANY, "sms", "withdrawn",
                       Proof(source="sms", actor="sms-reply", user_agent=f"SMS from {sender}"),
                       catalog=catalog)
    return InboundResult(keyword, customer, "withdrawn_sms")
