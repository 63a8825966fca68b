"""Erasure and export reach every domain that holds personal data, whatever today's catalog
offers and whichever optional parts are configured: here the catalog has no ``[loyalty]``
table (the programme was dropped after people joined), web push has no VAPID key, Google
Wallet no service account and Apple Wallet no signing certificate."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from portal import create_app
from portal.core.db import utcnow
from portal.loyalty import ledger
from portal.loyalty.models import LedgerEntry, Member, TermsAcceptance
from portal.loyalty.program import load_program
from portal.models.consent import ConsentEvent, ConsentProof, Suppression
from portal.models.customer import Customer, ExternalId, SignInSession
from portal.models.google_wallet import GoogleWalletObject
from portal.models.wallet import AppleDeviceRegistration, ApplePush, WalletNews
from portal.models.wallet_message import WalletMessage, WalletMessageRecipient
from portal.push import jobs as push_worker
from portal.push import subscriptions as push_service
from portal.push.models import PushDelivery, PushMessage, PushSubscription, PushTopicChoice
from portal.services import accounts, sign_ins, suppressions, wallet_apple
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.privacy import erase_customer, export_data, hooks_of
from portal.wallet_sync import google_client
from portal.wallet_ws.issuer import apple_wallet
from tests.conftest import CATALOG, app_config, submit

PASSWORD = "correct horse 1"
EMAIL = "ann@example.com"
PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
DEVICE, PUSH_TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "ab" * 32
ENDPOINT = "https://push.example.net/send/ann-browser"
DOMAINS = {"loyalty", "apple_wallet", "google_wallet", "wallet_messages",
           "web_push_subscriptions", "web_push_messages"}


@pytest.fixture
def catalog_without_loyalty(tmp_path: Path) -> Path:
    text = CATALOG.read_text(encoding="utf-8")
    copy = tmp_path / "catalog-without-loyalty.toml"
    copy.write_text(text[:text.index("\n[loyalty]")] + "\n", encoding="utf-8")
    assert load_program(copy) is None
    return copy


@pytest.fixture
def app(connection: Connection, tmp_path: Path, catalog_without_loyalty: Path) -> Flask:
    """No programme, no VAPID key, no Google service account, no Apple certificate."""
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                CATALOG_PATH=str(catalog_without_loyalty)))
    assert push_worker.public_key(app) is None
    assert google_client(app) is None
    assert not apple_wallet(app).available
    return app


def person_everywhere(session: Session) -> dict[str, Any]:
    """A customer with data in every domain: profile and consent, external ids, a
    suppression, a loyalty membership with its terms acceptance and ledger, an Apple card on a
    phone (with a queued push and news), a Google card, a queued wallet message, a browser
    subscription with a choice made before signing in, and a queued notification."""
    catalog = get_catalog(session)
    browser = Proof("portal", "customer:test", "203.0.113.9", "Browser/1")
    customer = accounts.create_customer(session, EMAIL, password=PASSWORD,
                                        phone="+33612345678", postal_address="1 rue de la Paix")
    accounts.mark_email_verified(session, customer, EMAIL)
    record_consent(session, customer, "offers", "email", "granted", browser, catalog=catalog)
    session.add(ExternalId(customer_id=customer.id, namespace="shop", value="C-1001"))
    suppressions.add(session, customer, "email", "hard_bounce", EMAIL)
    sign_ins.start(session, customer, "password", "Phone/2",
                   sign_ins.Limits(timedelta(days=7), timedelta(days=31)))

    member = ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version, browser)
    ledger.earn(session, PROGRAM, member, 300, reason="Order A-1", actor="store:paris",
                source_ref="A-1", store="Paris 11")

    card = wallet_apple.ensure_pass(session, member)
    wallet_apple.register_device(session, card, DEVICE, PUSH_TOKEN)
    wallet_apple.notify_pass_changed(session, member, "points")
    session.add(WalletNews(member_id=member.id, header="Hello", body="Double points",
                           locales={}, message_ref="wmsg_1", created_at=utcnow()))
    session.add(GoogleWalletObject(
        member_id=member.id, object_id=f"3388000000022233344.{member.member_number}",
        class_id="3388000000022233344.carnet-rewards", link_issued_at=utcnow(),
        saved_at=utcnow(), attempts=1, last_error=f"object for {EMAIL} refused"))
    wallet_message = WalletMessage(
        public_id="wmsg_erasure", topic_key="offers", header="Sale", body="Tomorrow only",
        localized={}, audience={"customers": [customer.id]}, actor="api:test",
        created_at=utcnow(), expanded_at=utcnow())
    session.add(wallet_message)
    session.flush()
    session.add(WalletMessageRecipient(
        message_id=wallet_message.id, customer_id=customer.id, platform="google",
        target=f"3388000000022233344.{member.member_number}", decision="send",
        reason="granted", status="queued", attempts=1, error="try again"))

    sub, _ = push_service.save_subscription(
        session, push_service.SubscriptionInput(ENDPOINT, "p" * 87, "a" * 22),
        customer=None, device_hash="d" * 64, user_agent="Browser/1", locale="en")
    [topic] = [t for t in push_service.web_push_topics(catalog) if t.key == "offers"]
    push_service.record_device_choice(session, sub, topic, "granted", browser)
    sub.customer_id = customer.id   # the browser was signed in afterwards
    push_message = PushMessage(public_id="pm_erasure", topic_key="offers",
                               audience={"customers": [customer.public_id]}, title="Sale",
                               body="Tomorrow only", ttl=3600, created_at=utcnow())
    session.add(push_message)
    session.flush()
    session.add(PushDelivery(message_id=push_message.id, subscription_id=sub.id,
                             customer_id=customer.id, status="queued",
                             next_attempt_at=utcnow() + timedelta(minutes=5)))
    session.commit()
    return {"customer": customer, "member": member, "card": card, "subscription": sub}


def sign_in(client: FlaskClient) -> FlaskClient:
    assert submit(client, "/login", {"email": EMAIL, "password": PASSWORD}).status_code == 302
    return client


def count(session: Session, model: Any, *where: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def assert_erased_everywhere(session: Session, data: dict[str, Any]) -> None:
    session.expire_all()
    customer_id = data["customer"].id
    customer = session.get(Customer, customer_id)
    assert customer.erased_at is not None and customer.email is None
    assert count(session, SignInSession, SignInSession.customer_id == customer_id) == 0
    assert count(session, ExternalId, ExternalId.customer_id == customer_id) == 0
    assert session.scalars(select(Suppression.address).where(
        Suppression.customer_id == customer_id)).all() == [None]
    customer_events = select(ConsentEvent.id).where(ConsentEvent.customer_id == customer_id)
    assert count(session, ConsentProof, ConsentProof.event_id.in_(customer_events),
                 ConsentProof.ip.is_not(None)) == 0

    # Loyalty, although today's catalog has no programme: the membership ends, the points
    # are forfeited on the ledger, the acceptance keeps no address or browser.
    member = session.get(Member, data["member"].id)
    assert member.left_at is not None and member.balance == 0
    assert [e.kind for e in session.scalars(select(LedgerEntry).where(
        LedgerEntry.member_id == member.id).order_by(LedgerEntry.id))] == ["earn", "expire"]
    acceptance = session.scalars(select(TermsAcceptance).where(
        TermsAcceptance.member_id == member.id)).one()
    assert (acceptance.ip, acceptance.user_agent) == (None, None)
    assert ledger.check_member(session, member) == []

    # Apple: no phone is known to hold the card any more, nothing is queued for it.
    assert count(session, AppleDeviceRegistration,
                 AppleDeviceRegistration.pass_id == data["card"].id) == 0
    assert count(session, ApplePush) == 0
    assert count(session, WalletNews, WalletNews.member_id == member.id) == 0

    # Google: the row stays for the worker to close the card; the error quoting it goes.
    google = session.scalars(select(GoogleWalletObject).where(
        GoogleWalletObject.member_id == member.id)).one()
    assert google.last_error is None

    # Wallet messages: nothing queued is delivered to an erased person.
    recipient = session.scalars(select(WalletMessageRecipient).where(
        WalletMessageRecipient.customer_id == customer_id)).one()
    assert (recipient.status, recipient.reason, recipient.error) == ("skipped", "erased", None)

    # Web push: the browser is forgotten, its choices too; its consent event keeps no proof.
    sub = session.get(PushSubscription, data["subscription"].id)
    assert sub.endpoint.startswith("erased:") and sub.endpoint != ENDPOINT
    assert (sub.p256dh, sub.auth, sub.user_agent, sub.device_hash) == ("", "", None, None)
    assert sub.expired_at is not None
    assert count(session, PushTopicChoice, PushTopicChoice.subscription_id == sub.id) == 0
    device_events = select(ConsentEvent.id).where(ConsentEvent.push_subscription_id == sub.id)
    assert count(session, ConsentProof, ConsentProof.event_id.in_(device_events)) == 1
    assert count(session, ConsentProof, ConsentProof.event_id.in_(device_events),
                 ConsentProof.ip.is_not(None)) == 0
    delivery = session.scalars(select(PushDelivery).where(
        PushDelivery.subscription_id == sub.id)).one()
    assert (delivery.status, delivery.reason) == ("expired", "erased")


def test_deleting_the_account_erases_every_domain_without_the_loyalty_table(
        app, client, session):
    data = person_everywhere(session)
    r = submit(sign_in(client), "/account/delete",
               {"confirm": "y", "current_password": PASSWORD})
    assert r.status_code == 200
    assert_erased_everywhere(session, data)


def test_erasure_outside_a_request_reaches_every_domain(app, session):
    """A command or the worker erases through the app, with no request and no blueprint
    involved: the parts are registered when the app is created."""
    data = person_everywhere(session)
    with app.app_context():
        hooks = hooks_of(current_app.extensions)
        assert hooks.domains == DOMAINS
        erase_customer(session, data["customer"], Proof("system", "system:erasure"),
                       get_catalog(session), hooks.erasers)
    session.commit()
    assert_erased_everywhere(session, data)


def test_download_includes_every_domain_without_the_loyalty_table(app, client, session):
    data = person_everywhere(session)
    r = submit(sign_in(client), "/account", {"export_password": PASSWORD},
               action="/account/export")
    assert r.status_code == 200
    exported = json.loads(r.get_data(as_text=True))
    assert DOMAINS <= set(exported)
    assert exported["profile"]["external_ids"] == [{"namespace": "shop", "value": "C-1001"}]
    assert "Phone/2" in [s["user_agent"] for s in exported["sessions"]]
    assert [(s["channel"], s["address"]) for s in exported["suppressions"]] == [
        ("email", EMAIL)]
    loyalty = exported["loyalty"]
    assert loyalty["member_number"] == data["member"].member_number
    assert loyalty["balance"] == 300 and [e["source_ref"] for e in loyalty["entries"]] == ["A-1"]
    assert [t["version"] for t in loyalty["terms_accepted"]] == [PROGRAM.terms.version]
    apple = exported["apple_wallet"]
    assert apple["serial_number"] == data["card"].serial_number
    assert [d["device_library_identifier"] for d in apple["devices"]] == [DEVICE]
    assert PUSH_TOKEN not in r.get_data(as_text=True)
    assert data["card"].authentication_token not in r.get_data(as_text=True)
    assert [n["body"] for n in apple["news"]] == ["Double points"]
    assert exported["google_wallet"]["object_id"].endswith(data["member"].member_number)
    assert [(m["message"], m["status"]) for m in exported["wallet_messages"]] == [
        ("wmsg_erasure", "queued")]
    [browser] = exported["web_push_subscriptions"]
    assert browser["user_agent"] == "Browser/1"
    assert [(t["topic"], t["state"]) for t in browser["topics"]] == [("offers", "granted")]
    assert [(m["message"], m["status"]) for m in exported["web_push_messages"]] == [
        ("pm_erasure", "queued")]


def test_each_app_holds_its_own_parts(app, connection, tmp_path):
    """Nothing lives in module globals: another app, with the full catalog, has its own."""
    other = create_app(app_config(tmp_path / "other", CARNET_DB_BIND=connection))
    assert hooks_of(other.extensions) is not hooks_of(app.extensions)
    assert hooks_of(other.extensions).domains == hooks_of(app.extensions).domains == DOMAINS


def test_export_function_takes_the_parts_it_is_given(app, session):
    data = person_everywhere(session)
    bare = export_data(session, data["customer"], get_catalog(session), {})
    assert not DOMAINS & set(bare)
