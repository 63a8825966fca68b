"""Data access and erasure (GDPR Art. 15, 17). Erasure removes personal data but keeps the
consent events, pseudonymous, as the proof the law asks for."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from portal.db import utcnow
from portal.models.consent import ANY, ConsentEvent, ConsentProof, ContactRule
from portal.models.customer import Customer, ExternalId
from portal.services import changes
from portal.services.catalog import Catalog
from portal.services.consent import Proof, history, record_consent
from portal.services.preferences import contact_pressure

# Other aggregates (loyalty, wallet, push) add their part of the export and erasure here:
# name -> f(session, customer) -> data / None.
EXPORTERS: dict[str, Any] = {}
ERASERS: list[Any] = []


def export_data(session: Session, customer: Customer, catalog: Catalog) -> dict[str, Any]:
    from portal.services.decisions import consent_matrix

    matrix = consent_matrix(session, catalog, customer, utcnow())
    data: dict[str, Any] = {
        "profile": {
            "id": customer.public_id,
            "email": customer.email,
            "email_verified_at": _iso(customer.email_verified_at),
            "phone": customer.phone,
            "postal_address": customer.postal_address,
            "locale": customer.locale,
            "timezone": customer.timezone,
            "created_at": _iso(customer.created_at),
            "external_ids": [
                {"namespace": e.namespace, "value": e.value}
                for e in session.scalars(select(ExternalId).where(ExternalId.customer_id ==
                                                                  customer.id))
            ],
        },
        "preferences": [
            {"topic": t, "channel": ch, "consented": d.allowed, "reason": d.reason}
            for (t, ch), d in matrix.items()
        ],
        "contact_pressure": [
            {"channel": r.channel, "max_per_week": r.max_per_week,
             "quiet_start": r.quiet_start.isoformat() if r.quiet_start else None,
             "quiet_end": r.quiet_end.isoformat() if r.quiet_end else None}
            for r in contact_pressure(session, customer).values()
        ],
        "consent_history": [
            {"event_id": e.id, "occurred_at": _iso(e.occurred_at), "topic": e.topic_key,
             "channel": e.channel, "state": e.state, "source": e.source,
             "wording_version": e.wording_version}
            for e in history(session, [customer.id], limit=100_000)
        ],
    }
    for name, exporter in EXPORTERS.items():
        data[name] = exporter(session, customer)
    return data


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def erase_customer(session: Session, customer: Customer, proof: Proof, catalog: Catalog) -> None:
    """Withdraw everything (as a last, provable event), then remove the personal data."""
    if customer.erased_at is not None:
        return
    record_consent(session, customer, ANY, ANY, "withdrawn", proof, catalog=catalog)
    event_ids = select(ConsentEvent.id).where(ConsentEvent.customer_id == customer.id)
    session.execute(
        update(ConsentProof).where(ConsentProof.event_id.in_(event_ids))
        .values(ip=None, user_agent=None)
    )
    session.execute(delete(ExternalId).where(ExternalId.customer_id == customer.id))
    session.execute(delete(ContactRule).where(ContactRule.customer_id == customer.id))
    for eraser in ERASERS:
        eraser(session, customer)
    customer.email = None
    customer.pending_email = None
    customer.password_hash = None
    customer.phone = None
    customer.postal_address = None
    customer.timezone = None
    customer.auth_epoch += 1
    customer.erased_at = utcnow()
    changes.emit(session, "customer.erased", {"customer": customer.public_id}, customer.id)
