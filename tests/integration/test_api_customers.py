"""Customers and identity through the API: lookup, create, upsert, merge, preferences,
consent from a call center."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from portal.core.db import new_session
from portal.models.consent import ConsentEvent, Suppression
from portal.outbox.models import Change
from tests.support.api_client import Api, field_errors


@pytest.fixture
def api(app, client):
    return Api(app, client)


def test_create_lookup_and_get(api):
    r = api.post("/customers", {"email": "Zoe@Example.com", "phone": "+33 6 12 34 56 78",
                                "locale": "fr", "timezone": "Europe/Paris",
                                "external_ids": [{"namespace": "crm", "value": "42"}]})
    assert r.status_code == 201, r.get_json()
    zoe = r.get_json()
    assert zoe["email"] == "zoe@example.com" and zoe["phone"] == "+33612345678"
    assert zoe["external_ids"] == [{"namespace": "crm", "value": "42"}]
    assert zoe["id"].startswith("cus_") and zoe["member_number"] is None
    for query in ("email=ZOE@example.com", "phone=%2B33612345678", "namespace=crm&value=42"):
        r = api.get(f"/customers/lookup?{query}")
        assert r.status_code == 200 and r.get_json()["id"] == zoe["id"], query
    assert api.get(f"/customers/{zoe['id']}").get_json()["email"] == "zoe@example.com"
    assert api.get("/customers/lookup?email=nobody@example.com").status_code == 404
    assert api.get("/customers/cus_nobody").status_code == 404
    r = api.get("/customers/lookup?email=a@b.c&phone=1")
    assert r.status_code == 422 and field_errors(r) == {"query": "exactly_one"}


def test_create_conflicts_are_409_with_the_field(api):
    api.post("/customers", {"email": "taken@example.com", "phone": "+33611111111",
                            "external_ids": [{"namespace": "crm", "value": "1"}]})
    for body, name in (({"email": "TAKEN@example.com"}, "email"),
                       ({"phone": "+33611111111"}, "phone"),
                       ({"external_ids": [{"namespace": "crm", "value": "1"}]},
                        "external_ids[0]")):
        r = api.post("/customers", body)
        assert r.status_code == 409, body
        assert r.get_json()["errors"][0]["field"] == name
    r = api.post("/customers", {"email": "not an email"})
    assert r.status_code == 422 and field_errors(r) == {"email": "invalid_email"}


def test_upsert_by_external_id(api):
    r = api.put("/customers/external/shop/S-9", {"email": "s9@example.com", "locale": "en"})
    assert r.status_code == 201
    created = r.get_json()
    r = api.put("/customers/external/shop/S-9", {"postal_address": "1 rue de la Paix"})
    assert r.status_code == 200
    assert r.get_json()["id"] == created["id"]
    assert r.get_json()["postal_address"] == "1 rue de la Paix"
    r = api.put("/customers/external/shop/S-9", {"unknown": 1})
    assert r.status_code == 422 and field_errors(r) == {"unknown": "unknown_field"}


def test_merge_keeps_the_most_restrictive_choice_and_both_histories(api):
    a = api.customer("a@example.com")
    b = api.customer(None, phone="+33622222222")
    api.consent(a, "newsletter", "email", "granted")
    api.consent(b, "newsletter", "email", "withdrawn")
    api.consent(a, "offers", "postal", "withdrawn")
    api.consent(b, "offers", "postal", "granted")
    api.consent(b, "events", "email", "pending")
    api.consent(b, "*", "voice", "withdrawn")
    api.add(Suppression(customer_id=b.id, channel="sms", reason="sms_stop"))
    r = api.post("/customers/merge", {"survivor": {"id": a.public_id},
                                      "merged": {"phone": "+33622222222"}})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["phone"] == "+33622222222"  # moved over: the survivor had none

    cells = {(p["topic"], p["channel"]): p for p in
             api.get(f"/customers/{a.public_id}/preferences").get_json()["preferences"]}
    assert cells[("newsletter", "email")]["reason"] == "withdrawn"
    assert cells[("offers", "postal")]["reason"] == "withdrawn"
    assert cells[("offers", "sms")]["reason"] == "suppressed"
    assert cells[("events", "email")]["reason"] == "pending_confirmation"
    assert cells[("surveys", "voice")]["reason"] == "channel_off"
    assert cells[("newsletter", "email")]["evidence"]["source"] == "merge"
    r = api.post("/decisions", {"customer": {"id": b.public_id}, "topic": "account",
                                "channel": "sms"})
    assert r.get_json()["reason"] == "suppressed"

    session = new_session(api.app)
    events = session.scalars(select(ConsentEvent).where(
        ConsentEvent.customer_id.in_([a.id, b.id]))).all()
    assert {e.customer_id for e in events} == {a.id, b.id}  # both histories kept
    assert any(e.source == "merge" for e in events)
    merged_change = session.scalars(select(Change).where(Change.type == "customer.merged")).one()
    assert merged_change.data["merged"] == b.public_id
    from portal.services.identity import history_ids

    assert set(history_ids(session, session.merge(a))) == {a.id, b.id}
    session.close()

    again = api.post("/customers/merge", {"survivor": {"id": a.public_id},
                                          "merged": {"id": b.public_id}})
    assert again.status_code == 422
    assert field_errors(again) == {"merged": "same_customer"}  # b resolves to a now
    r = api.post("/customers/merge", {"survivor": {"id": a.public_id},
                                      "merged": {"email": "nobody@example.com"}})
    assert field_errors(r) == {"merged": "unknown_customer"}


def test_consent_from_a_call_center(api):
    c = api.customer("caller@example.com")
    body = {"topic": "offers", "channel": "sms", "state": "granted", "source": "call_center",
            "actor": "agent-17", "wording_version": 1, "ip": None}
    r = api.post(f"/customers/{c.public_id}/consents", body)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["wording_version"] == 1
    r = api.post(f"/customers/{c.public_id}/consents", {**body, "topic": "*", "channel": "*",
                                                         "state": "withdrawn"})
    assert r.status_code == 201
    prefs = api.get(f"/customers/{c.public_id}/preferences").get_json()["preferences"]
    assert {p["reason"] for p in prefs if p["topic"] == "offers"} == {"marketing_paused"}
    for patch, name, code in (({"topic": "nope"}, "topic", "unknown_topic"),
                              ({"topic": "newsletter", "channel": "sms"}, "channel",
                               "channel_not_offered"),
                              ({"topic": "account", "state": "withdrawn"}, "topic",
                               "required_topic"),
                              ({"wording_version": 99}, "wording_version", "unknown_wording"),
                              ({"state": "maybe"}, "state", "enum")):
        r = api.post(f"/customers/{c.public_id}/consents", {**body, **patch})
        assert r.status_code == 422 and field_errors(r) == {name: code}, patch
    assert api.post("/customers/cus_nobody/consents", body).status_code == 404
