"""Data access and erasure (GDPR Art. 15, 17). Erasure removes personal data but keeps the
consent events, pseudonymous, as the proof the law asks for.

The customer's profile and consent are handled here; every other domain that holds personal
data (loyalty, wallet cards, wallet messages, browser notifications) registers its own part in
the application's :class:`PrivacyHooks` when the application is created, whatever the catalog
offers or which pages are mounted. The caller (a view, a command) takes the parts from the
application and hands them to :func:`export_data` and :func:`erase_customer`, so this module
knows nothing of Flask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.consent import ANY, ConsentEvent, ConsentProof, ContactRule, Suppression
from portal.models.customer import Customer, ExternalId, SignInSession
from portal.outbox import changes
from portal.services import sign_ins
from portal.services.catalog import Catalog
from portal.services.consent import Proof, history, record_consent
from portal.services.preferences import contact_pressure

#: ``app.extensions`` key of the application's :class:`PrivacyHooks`.
EXTENSION = "carnet.privacy"

Exporter = Callable[[Session, Customer], Any]
Eraser = Callable[[Session, Customer], None]


class PrivacyHooks:
    """The parts of export and erasure that domains contribute, by domain name.

    A domain that holds personal data registers both an eraser and an exporter, under the
    name its part has in the export. Registering a name again replaces the earlier hook, so
    wiring an application twice does not erase twice.
    """

    def __init__(self) -> None:
        self._erasers: dict[str, Eraser] = {}
        self._exporters: dict[str, Exporter] = {}

    def add_eraser(self, name: str, eraser: Eraser) -> None:
        self._erasers[name] = eraser

    def add_exporter(self, name: str, exporter: Exporter) -> None:
        self._exporters[name] = exporter

    @property
    def erasers(self) -> list[Eraser]:
        """In registration order."""
        return list(self._erasers.values())

    @property
    def exporters(self) -> dict[str, Exporter]:
        return dict(self._exporters)

    @property
    def domains(self) -> set[str]:
        """Names with an eraser or an exporter."""
        return set(self._erasers) | set(self._exporters)


def hooks_of(extensions: MutableMapping[str, Any]) -> PrivacyHooks:
    """The application's hooks (``app.extensions``), created on first use."""
    hooks: PrivacyHooks = extensions.setdefault(EXTENSION, PrivacyHooks())
    return hooks


def export_data(session: Session, customer: Customer, catalog: Catalog,
                exporters: Mapping[str, Exporter]) -> dict[str, Any]:
    """Everything held about ``customer``: the profile and consent, then each domain's part
    (``exporters``: the application's :attr:`PrivacyHooks.exporters`)."""
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
        "suppressions": [
            {"channel": s.channel, "reason": s.reason, "address": s.address,
             "source": s.source, "created_at": _iso(s.created_at),
             "lifted_at": _iso(s.lifted_at)}
            for s in session.scalars(select(Suppression).where(
                Suppression.customer_id == customer.id).order_by(Suppression.id))
        ],
        "sessions": [
            {"method": s.method, "user_agent": s.user_agent, "created_at": _iso(s.created_at),
             "last_seen_at": _iso(s.last_seen_at)}
            for s in session.scalars(select(SignInSession).where(
                SignInSession.customer_id == customer.id).order_by(SignInSession.id))
        ],
    }
    for name, exporter in exporters.items():
        data[name] = exporter(session, customer)
    return data


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def erase_customer(session: Session, customer: Customer, proof: Proof, catalog: Catalog,
                   erasers: Iterable[Eraser]) -> None:
    """Withdraw everything (as a last, provable event), then remove the personal data, each
    domain's part through ``erasers`` (the application's :attr:`PrivacyHooks.erasers`)."""
    if customer.erased_at is not None:
        return
    record_consent(session, customer, ANY, ANY, "withdrawn", proof, catalog=catalog)
    event_ids = select(ConsentEvent.id).where(ConsentEvent.customer_id == customer.id)
    session.execute(
        update(ConsentProof).where(ConsentProof.event_id.in_(event_ids))
        .values(ip=None, user_agent=None)
    )
    session.execute(update(Suppression).where(Suppression.customer_id == customer.id)
                    .values(address=None))
    session.execute(delete(ExternalId).where(ExternalId.customer_id == customer.id))
    session.execute(delete(ContactRule).where(ContactRule.customer_id == customer.id))
    for eraser in erasers:
        eraser(session, customer)
    sign_ins.end_all(session, customer)  # every signed-in browser, with its user agent
    customer.email = None
    customer.pending_email = None
    customer.password_hash = None
    customer.phone = None
    customer.postal_address = None
    customer.timezone = None
    customer.auth_epoch += 1
    customer.erased_at = utcnow()
    changes.emit(session, "customer.erased", {"customer": customer.public_id}, customer.id)
