"""Fixtures for the security tests: an app with every optional part switched on (Apple and
Google wallet cards, web push), people with data worth stealing, and row counts to prove that
a refused request wrote nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from passes.google_dev import create_dev_service_account
from portal import create_app
from portal.core import tokens
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import load_program
from portal.models.customer import Customer
from portal.push.webpush import generate_vapid_keys
from portal.services import accounts
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.wallet_ws.issuer import apple_wallet
from tests.conftest import CATALOG, app_config, csrf_from
from tests.support.apple_wallet import dev_credentials, wallet_settings

# Hypothesis: bounded so the whole folder stays within a few minutes on two cores. Examples
# share one app and one client per test (function-scoped fixtures): each example is one
# request whose effect is checked on its own, so sharing them is what we want, not a leak.
settings.register_profile(
    "security", max_examples=40, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "security-quick", max_examples=8, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

PASSWORD = "correct horse 1"
PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
VAPID = generate_vapid_keys()
# Tables a refused request must leave untouched.
WATCHED_TABLES = ("customers", "consent_events", "consent_states", "consent_proofs", "changes",
                  "contact_rules", "loyalty_members", "loyalty_ledger", "push_subscriptions",
                  "push_topic_choices", "suppressions", "api_keys", "webhooks")


@pytest.fixture(scope="session")
def apple_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dev_credentials(tmp_path_factory.mktemp("apple"))


@pytest.fixture(scope="session")
def google_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_dev_service_account(tmp_path_factory.mktemp("google") / "sa.json",
                                      token_uri="http://127.0.0.1:9/token")


def full_config(tmp_path: Path, connection: Connection, apple_paths: dict[str, Path],
                google_key: Path, **overrides: Any) -> dict[str, Any]:
    return app_config(tmp_path, CARNET_DB_BIND=connection, **wallet_settings(apple_paths),
                      GOOGLE_SERVICE_ACCOUNT_FILE=str(google_key),
                      VAPID_PRIVATE_KEY=VAPID.private_pem, **overrides)


@pytest.fixture
def app(connection: Connection, tmp_path: Path, apple_paths: dict[str, Path],
        google_key: Path) -> Iterator[Flask]:
    app = create_app(full_config(tmp_path, connection, apple_paths, google_key))
    yield app
    apple_wallet(app).close()


@dataclass
class Person:
    customer: Customer
    member: Member | None

    @property
    def email(self) -> str:
        return self.customer.email or ""

    @property
    def public_id(self) -> str:
        return self.customer.public_id


def make_person(session: Session, email: str, *, postal_address: str | None = None,
                phone: str | None = None, member: bool = True, points: int = 0) -> Person:
    """A verified customer with a password, a consent history and (optionally) a loyalty
    membership with points; committed so the app's requests see it."""
    customer = accounts.create_customer(session, email, postal_address=postal_address,
                                        phone=phone, locale="en")
    customer.password_hash = accounts.passwords.hash(PASSWORD)
    accounts.mark_email_verified(session, customer, email)
    catalog = get_catalog(session)
    record_consent(session, customer, "newsletter", "email", "granted",
                   Proof("portal", f"customer:{customer.public_id}", "198.51.100.7", "test"),
                   catalog=catalog)
    record_consent(session, customer, "offers", "sms", "withdrawn",
                   Proof("call_center", "agent-1"), catalog=catalog)
    found = None
    if member:
        assert PROGRAM is not None
        found = ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version,
                              Proof("portal", "test"))
        if points:
            ledger.earn(session, PROGRAM, found, points, reason=f"Order of {email}",
                        source_ref=f"order-{customer.public_id}", actor="store:test")
    session.commit()
    return Person(customer, found)


@pytest.fixture
def ann(session: Session) -> Person:
    return make_person(session, "ann@example.com", postal_address="1 Ann Street, Annville",
                       phone="+33612345678", points=120)


@pytest.fixture
def bob(session: Session) -> Person:
    return make_person(session, "bob@example.com", postal_address="2 Bob Road, Bobtown",
                       phone="+33698765432", points=40)


def manage_token(app: Flask, customer: Customer) -> str:
    return tokens.make_token(app.config["SECRET_KEY"], "manage",
                             {"c": customer.public_id, "e": customer.auth_epoch})


def sign_in_by_link(app: Flask, client: FlaskClient, customer: Customer) -> None:
    response = client.get(f"/m/{manage_token(app, customer)}")
    assert response.status_code == 302, response.status_code


def signed_in_client(app: Flask, customer: Customer) -> FlaskClient:
    client = app.test_client()
    sign_in_by_link(app, client, customer)
    return client


def page_token(client: FlaskClient, page: str) -> str:
    return csrf_from(client.get(page).get_data(as_text=True))


def meta_token(client: FlaskClient, page: str = "/push") -> str:
    html = client.get(page).get_data(as_text=True)
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match, "page has no CSRF meta tag"
    return match.group(1)


COUNTS = select(*(select(func.count()).select_from(text(table)).scalar_subquery()
                  for table in WATCHED_TABLES))


def row_counts(session: Session) -> dict[str, int]:
    """Rows per watched table, in one round trip."""
    session.expire_all()
    return dict(zip(WATCHED_TABLES, (int(n) for n in session.execute(COUNTS).one()),
                    strict=True))


def is_signed_in(client: FlaskClient) -> bool:
    return client.get("/preferences").status_code == 200
