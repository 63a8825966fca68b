"""Download my data; delete my account (erasure keeps the consent events, pseudonymous)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from portal.core.db import utcnow
from portal.models.consent import ConsentEvent, ConsentProof
from portal.models.customer import Customer
from portal.services import accounts
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.decisions import decide_many
from tests.conftest import path_of, submit

PASSWORD = "correct horse 1"


@pytest.fixture
def customer(session):
    c = accounts.create_customer(session, "ann@example.com", password=PASSWORD,
                                 phone="+33612345678", postal_address="1 rue de la Paix")
    accounts.mark_email_verified(session, c, "ann@example.com")
    record_consent(session, c, "offers", "sms", "granted",
                   Proof("portal", "test", "203.0.113.9", "Browser/1"))
    session.commit()
    return c


@pytest.fixture
def signed_in(client, customer):
    assert submit(client, "/login", {"email": "ann@example.com", "password": PASSWORD}
                  ).status_code == 302
    return client


def test_download_my_data(signed_in, customer):
    submit(signed_in, "/preferences", {"phone": "+33 6 12 34 56 78",
                                       "postal_address": "1 rue de la Paix"},
           action="/preferences/contact")
    r = submit(signed_in, "/account", {"export_password": PASSWORD}, action="/account/export")
    assert r.status_code == 200
    assert r.mimetype == "application/json"
    assert r.headers["Content-Disposition"].startswith("attachment;")
    data = json.loads(r.get_data(as_text=True))
    assert data["profile"]["email"] == "ann@example.com"
    assert data["profile"]["phone"] == "+33612345678"
    assert data["profile"]["id"] == customer.public_id
    prefs = {(p["topic"], p["channel"]): p for p in data["preferences"]}
    assert prefs[("offers", "sms")]["consented"] is True
    assert prefs[("newsletter", "email")]["consented"] is False
    assert [(e["topic"], e["channel"], e["state"]) for e in data["consent_history"]] == [
        ("offers", "sms", "granted")]


def test_download_needs_a_signed_in_post(client, customer):
    assert client.get("/account/export").status_code == 405
    r = client.post("/account/export")
    assert r.status_code in (302, 400)
    assert r.mimetype != "application/json"


def test_delete_needs_the_tick_and_the_password(signed_in, session, customer):
    page = signed_in.get("/account/delete")
    assert page.status_code == 200
    r = submit(signed_in, "/account/delete", {"current_password": PASSWORD})
    assert r.status_code == 422
    assert "Tick the box to confirm." in r.get_data(as_text=True)
    r = submit(signed_in, "/account/delete", {"confirm": "y"})
    assert r.status_code == 422
    assert "Enter your current password" in r.get_data(as_text=True)
    r = submit(signed_in, "/account/delete", {"confirm": "y", "current_password": "wrong one!"})
    assert r.status_code == 422
    session.expire_all()
    assert session.get(Customer, customer.id).email == "ann@example.com"
    assert session.get(Customer, customer.id).erased_at is None


def test_delete_erases_personal_data_and_keeps_the_events(app, signed_in, session, customer,
                                                         outbox):
    r = submit(signed_in, "/account/delete", {"confirm": "y", "current_password": PASSWORD},
               headers={"User-Agent": "Browser/2"})
    assert r.status_code == 200
    assert "Your account is deleted" in r.get_data(as_text=True)
    assert signed_in.get("/preferences").status_code == 302

    session.expire_all()
    row = session.get(Customer, customer.id)
    assert row.erased_at is not None
    assert (row.email, row.phone, row.postal_address, row.password_hash) == (None,) * 4
    event_ids = session.scalars(select(ConsentEvent.id).where(
        ConsentEvent.customer_id == customer.id)).all()
    assert len(event_ids) == 2  # the grant and the final withdrawal
    proofs = session.scalars(select(ConsentProof).where(ConsentProof.event_id.in_(event_ids))
                             ).all()
    assert len(proofs) == 2
    assert all(p.ip is None and p.user_agent is None for p in proofs)

    catalog = get_catalog(session)
    [decision] = decide_many(session, catalog, [(row, "offers", "sms")], utcnow())
    assert (decision.decision, decision.reason) == ("deny", "erased")

    again = app.test_client()
    r = submit(again, "/login", {"email": "ann@example.com", "password": PASSWORD})
    assert r.status_code == 401

    r = submit(again, "/signup", {"email": "ann@example.com", "password": PASSWORD,
                                  "confirm": PASSWORD})
    assert r.status_code == 200
    assert "/verify/" in outbox.link("ann@example.com", "/verify/")
    new = session.scalars(select(Customer).where(Customer.email == "ann@example.com")).one()
    assert new.id != customer.id
    assert new.public_id != customer.public_id
    assert session.scalar(select(func.count()).select_from(ConsentEvent).where(
        ConsentEvent.customer_id == new.id)) == 0


def test_delete_with_a_confirmation_link_needs_no_password(app, session, customer, outbox):
    client = app.test_client()
    submit(client, "/link", {"email": "ann@example.com"})
    client.get(path_of(outbox.link("ann@example.com", "/m/")))
    submit(client, "/account/delete", {"next": "delete"}, action="/account/confirm")
    submit(client, path_of(outbox.link("ann@example.com", "/account/confirm/")), {})
    r = submit(client, "/account/delete", {"confirm": "y"})
    assert r.status_code == 200
    session.expire_all()
    assert session.get(Customer, customer.id).erased_at is not None


def test_old_links_stop_after_deletion(app, signed_in, session, customer, outbox):
    client = app.test_client()
    submit(client, "/link", {"email": "ann@example.com"})
    link = path_of(outbox.link("ann@example.com", "/m/"))
    submit(signed_in, "/account/delete", {"confirm": "y", "current_password": PASSWORD})
    assert client.get(link).status_code == 400
    assert client.get("/preferences").status_code == 302
