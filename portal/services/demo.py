"""Demo data for the local run: one customer with a little history."""

from __future__ import annotations

from datetime import time, timedelta

from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.customer import Customer
from portal.services import accounts
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.preferences import PressureRule, set_contact_pressure

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "demo-password-2026"

# Other aggregates (loyalty) add their demo data: f(session, customer).
EXTRAS: list = []


def ensure_demo(session: Session) -> tuple[Customer, str]:
    """Idempotent: a second run keeps the customer and its data."""
    existing = accounts.find_by_email(session, DEMO_EMAIL)
    if existing is not None:
        for extra in EXTRAS:
            extra(session, existing)
        return existing, DEMO_PASSWORD
    customer = accounts.create_customer(
        session, DEMO_EMAIL, password=DEMO_PASSWORD, phone="+33612345678", locale="en",
        timezone="Europe/Paris", postal_address="12 rue des Lilas\n75011 Paris\nFrance",
        source="import",
    )
    customer.email_verified_at = utcnow()
    catalog = get_catalog(session)
    start = utcnow() - timedelta(days=40)
    proof = Proof("import", "system:demo")
    for days, topic, channel, state in [
        (0, "newsletter", "email", "granted"),
        (1, "offers", "email", "granted"),
        (1, "offers", "sms", "granted"),
        (12, "events", "email", "granted"),
        (30, "offers", "sms", "withdrawn"),
    ]:
        record_consent(session, customer, topic, channel, state, proof, catalog=catalog,
                       at=start + timedelta(days=days))
    set_contact_pressure(session, customer, "Europe/Paris", {
        "sms": PressureRule(2, time(21, 0), time(9, 0)),
    })
    for extra in EXTRAS:
        extra(session, customer)
    return customer, DEMO_PASSWORD
