"""POST/GET /api/v1/wallet/messages: validation, the consent decision on channel ``wallet`` for
every person, delivery by the worker to Google cards (against a local Google) and Apple
cards, and the per-platform report."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from passes.google import build_loyalty_class
from portal.core.db import new_session, utcnow
from portal.loyalty.models import Member
from portal.models.consent import Dispatch
from portal.models.customer import Customer
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject
from portal.models.wallet import WalletNews
from portal.models.wallet_message import WalletMessageRecipient
from portal.outbox import worker
from portal.services import wallet_apple, wallet_google, wallet_messages
from portal.services.catalog import get_catalog
from portal.services.wallet_messages import deliver_due
from portal.wallet_sync import google_client
from tests.support.api_client import Api, field_errors, make_key
from tests.support.fake_google import FakeGoogle
from tests.support.wallet_google import PROGRAM, google_app, google_fake, new_member  # noqa: F401  (fixtures)

JOB = "wallet.messages"
MESSAGE = {"topic": "loyalty", "audience": "all", "header": "Double points",
           "body": "Double points on everything this weekend.",
           "localized": {"fr": {"header": "Points doublés",
                                "body": "Points doublés sur tout ce week-end."}}}




@pytest.fixture
def api(app: Flask, client: Any) -> Api:
    return Api(app, client)


class People:
    """Customers with or without cards and consent, made through the app's sessions."""

    def __init__(self, app: Flask, api: Api, google: FakeGoogle) -> None:
        self.app, self.api, self.google = app, api, google
        self.settings = wallet_google.settings_from(app.config)

    def make(self, *, google_card: bool = False, apple_card: bool = False,
             consent: str | None = "granted", locale: str = "en") -> Customer:
        session = new_session(self.app)
        with session.begin():
            member = new_member(session, locale=locale)
            if google_card:
                wallet_google.save_link(session, PROGRAM, member, self.settings)
                card = wallet_google.card_for(session, member)
                assert card is not None
                card.saved_at = utcnow()
                object_id = card.object_id
            if apple_card:
                apple_pass = wallet_apple.ensure_pass(session, member)
                wallet_apple.register_device(session, apple_pass, f"device{member.id}",
                                             "a" * 64)
            customer = session.get(Customer, member.customer_id)
        session.close()
        assert customer is not None
        if consent:
            self.api.consent(customer, "loyalty", "wallet", consent)
        if google_card:   # the card exists at Google (the member saved it)
            self.put_object(object_id, member.id)
        return customer

    def put_object(self, object_id: str, member_id: int) -> None:
        client = google_client(self.app)
        assert client is not None
        session = new_session(self.app)
        with session.begin():
            member = session.get(Member, member_id)
            assert member is not None
            data = wallet_google.member_data(session, PROGRAM, member, self.settings)
        session.close()
        client.ensure_class(build_loyalty_class(wallet_google.program_data(PROGRAM,
                                                                           self.settings)))
        client.ensure_object(wallet_google.object_body(PROGRAM, self.settings, data))

    def rows(self, **where: Any) -> list[WalletMessageRecipient]:
        session = new_session(self.app)
        with session.begin():
            query = select(WalletMessageRecipient)
            for name, value in where.items():
                query = query.where(getattr(WalletMessageRecipient, name) == value)
            rows = list(session.scalars(query))
        session.close()
        return rows


@pytest.fixture
def people(app: Flask, api: Api, google: FakeGoogle) -> People:
    return People(app, api, google)


def add_messages(google: FakeGoogle) -> list[Any]:
    return [r for r in google.wallet_requests if r.path.endswith("/addMessage")]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field", "code"), [
    ({"topic": None}, "topic", "null"),
    ({"audience": "everyone"}, "audience", "type"),
    ({"audience": {"customers": []}}, "audience.customers", "too_few"),
    ({"audience": {"ids": ["x"]}}, "audience.ids", "unknown_field"),
    ({"header": ""}, "header", "required"),
    ({"header": "x" * 121}, "header", "too_long"),
    ({"header": "   "}, "header", "blank"),
    ({"localized": {"de": {"header": "a", "body": "b"}}}, "localized.de", "unknown_field"),
    ({"localized": {"fr": {"header": "a"}}}, "localized.fr.body", "required"),
    ({"topic": "no-such-topic"}, "topic", "unknown_topic"),
    ({"topic": "newsletter"}, "topic", "channel_not_offered"),
    ({"audience": {"customers": ["cus_nobody"]}}, "audience.customers[0]", "unknown_customer"),
])
def test_invalid_messages_are_refused_naming_the_field(api: Api, change: dict[str, Any],
                                                       field: str, code: str):
    response = api.post("/wallet/messages", {**MESSAGE, **change})
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"
    assert field_errors(response).get(field) == code, response.get_json()


def test_missing_fields_and_the_scope(app: Flask, api: Api):
    response = api.post("/wallet/messages", {"topic": "loyalty"})
    assert field_errors(response) == {"audience": "required", "header": "required",
                                      "body": "required"}
    other = make_key(app, "decisions:read", name="reader")
    assert api.post("/wallet/messages", MESSAGE, key=other).status_code == 403
    assert api.get("/wallet/messages/wmsg_nope").status_code == 404


def test_the_endpoints_are_in_the_openapi_document(client: Any):
    paths = client.get("/api/v1/openapi.json").get_json()["paths"]
    post = paths["/api/v1/wallet/messages"]["post"]
    assert post["x-scopes"] == ["push:send"] and "202" in post["responses"]
    assert "422" in post["responses"]
    assert "get" in paths["/api/v1/wallet/messages/{message_id}"]


# --- decisions and delivery ---------------------------------------------------------------------


def test_each_person_is_decided_and_each_card_gets_the_message(app: Flask, api: Api,
                                                               people: People,
                                                               google: FakeGoogle):
    both = people.make(google_card=True, apple_card=True, locale="fr")
    google_only = people.make(google_card=True)
    withdrawn = people.make(google_card=True, consent="withdrawn")
    never_asked = people.make(apple_card=True, consent=None)
    no_card = people.make()
    audience = [c.public_id for c in (both, google_only, withdrawn, never_asked, no_card)]

    accepted = api.post("/wallet/messages", {**MESSAGE, "audience": {"customers": audience}})
    assert accepted.status_code == 202
    message_id = accepted.get_json()["id"]
    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["status"] == "accepted" and report["recipients"] == 0
    assert add_messages(google) == []                       # nothing sent by the request

    worker.run_once(app, [JOB])

    sent = add_messages(google)
    assert len(sent) == 2                                   # the two consenting Google cards
    objects = {r.path.split("/")[-2] for r in sent}
    session = new_session(app)
    with session.begin():
        cards = {c.object_id: c.member_id for c in session.scalars(select(GoogleWalletObject))}
        news = list(session.scalars(select(WalletNews)))
        dispatches = list(session.scalars(select(Dispatch).where(
            Dispatch.message_id == message_id)))
    session.close()
    assert objects <= set(cards)
    french = next(r.body["message"] for r in sent
                  if r.body["message"]["localizedHeader"]["defaultValue"]["language"] == "fr")
    assert french["messageType"] == "TEXT_AND_NOTIFY" and french["id"] == message_id
    assert french["localizedHeader"]["defaultValue"]["value"] == "Points doublés"
    assert {v["language"] for v in french["localizedBody"]["translatedValues"]} == {"en", "fr"}
    assert [(n.header, n.locales["fr"]["header"], n.message_ref) for n in news] == \
        [("Double points", "Points doublés", message_id)]
    assert sorted(d.channel for d in dispatches) == ["wallet", "wallet"]   # one per person

    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["status"] == "done" and report["recipients"] == 5
    assert report["platforms"] == {
        "google": {"queued": 0, "sent": 2, "failed": 0, "skipped": {},
                   "denied": {"withdrawn": 1}},
        "apple": {"queued": 0, "sent": 1, "failed": 0, "skipped": {},
                  "denied": {"not_consented": 1}},
        "none": {"queued": 0, "sent": 0, "failed": 0, "skipped": {},
                 "denied": {"no_contact_point": 1}},
    }


def test_audience_all_reaches_everyone_with_a_saved_card(app: Flask, api: Api,
                                                         people: People, google: FakeGoogle):
    people.make(google_card=True)
    people.make(google_card=True, consent="withdrawn")
    people.make()                                           # no card: not in "all"
    message_id = api.post("/wallet/messages", MESSAGE).get_json()["id"]
    worker.run_once(app, [JOB])
    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["recipients"] == 2
    assert report["platforms"]["google"]["sent"] == 1
    assert report["platforms"]["google"]["denied"] == {"withdrawn": 1}
    assert len(add_messages(google)) == 1


def test_a_card_whose_notifications_are_spent_gets_the_message_without_one(
        app: Flask, api: Api, people: People, google: FakeGoogle):
    customer = people.make(google_card=True)
    session = new_session(app)
    with session.begin():
        card = session.scalars(select(GoogleWalletObject)).one()
        for hours in (1, 2, 3):
            session.add(GoogleNotification(object_row_id=card.id, kind="update",
                                           sent_at=utcnow() - timedelta(hours=hours)))
    session.close()
    api.post("/wallet/messages", {**MESSAGE, "audience": {"customers": [customer.public_id]}})
    worker.run_once(app, [JOB])
    [request] = add_messages(google)
    assert request.body["message"]["messageType"] == "TEXT"


def test_google_errors_are_retried_then_sent(app: Flask, api: Api, people: People,
                                            google: FakeGoogle):
    customer = people.make(google_card=True)
    message_id = api.post("/wallet/messages", {
        **MESSAGE, "audience": {"customers": [customer.public_id]}}).get_json()["id"]
    google.fail_next(1, 503)
    worker.run_once(app, [JOB])
    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["status"] == "delivering" and report["platforms"]["google"]["queued"] == 1
    [row] = people.rows(platform="google")
    assert row.attempts == 1 and "503" in (row.error or "") and row.next_attempt_at

    session = new_session(app)
    with session.begin():
        catalog = get_catalog(session)
    session.close()
    client = google_client(app)
    deliver_due(lambda: new_session(app), catalog, client, now=row.next_attempt_at)
    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["status"] == "done" and report["platforms"]["google"]["sent"] == 1
    assert len(add_messages(google)) == 2                   # the 503, then the message
    [card] = google.objects.values()
    assert [m["id"] for m in card["messages"]] == [message_id]


def test_a_recipient_whose_delivery_raises_does_not_stop_the_others(
        app: Flask, api: Api, people: People, google: FakeGoogle):
    """A queued row for a card that no longer exists makes its delivery raise: that row is
    retried later, and the cards after it get the message in the same run."""
    first, second = people.make(google_card=True), people.make(google_card=True)
    gone = people.make()
    message_id = api.post("/wallet/messages", {
        **MESSAGE, "audience": {"customers": [first.public_id, second.public_id]}
    }).get_json()["id"]
    session = new_session(app)
    with session.begin():
        message = wallet_messages.find(session, message_id)
        assert message is not None
        session.add(WalletMessageRecipient(   # claimed first: the lowest id
            message_id=message.id, customer_id=gone.id, platform="google",
            target="3388000000000000000.gone", decision="send", reason="granted",
            status="queued", attempts=0))
    session.close()
    worker.run_once(app, [JOB])
    assert len(add_messages(google)) == 2
    [poisoned] = people.rows(target="3388000000000000000.gone")
    assert poisoned.status == "queued" and poisoned.attempts == 1
    assert poisoned.next_attempt_at is not None and poisoned.leased_until is None
    assert poisoned.error == "unexpected error (AssertionError)"
    assert len([r for r in people.rows(platform="google") if r.status == "sent"]) == 2


def test_a_message_sent_before_a_crash_is_not_sent_twice(app: Flask, api: Api, people: People,
                                                        google: FakeGoogle):
    customer = people.make(google_card=True)
    message_id = api.post("/wallet/messages", {
        **MESSAGE, "audience": {"customers": [customer.public_id]}}).get_json()["id"]
    worker.run_once(app, [JOB])
    [row] = people.rows(platform="google")
    # As if the worker died after Google accepted the message but before recording it.
    session = new_session(app)
    with session.begin():
        stored = session.get(WalletMessageRecipient, row.id)
        assert stored is not None
        stored.status, stored.sent_at = "queued", None
    session.close()
    google.fail_next(1, 409, message="Message id already exists")
    worker.run_once(app, [JOB])
    report = api.get(f"/wallet/messages/{message_id}").get_json()
    assert report["platforms"]["google"]["sent"] == 1 and report["status"] == "done"
