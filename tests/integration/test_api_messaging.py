"""Suppressions, inbound SMS keywords and unsubscribe links through the API."""

from __future__ import annotations

import pytest

from portal.services.suppressions import stop_keyword
from tests.support.api_client import Api, field_errors, make_key


@pytest.fixture
def api(app, client):
    return Api(app, client)


def decide(api, email, topic="account", channel="email"):
    return api.post("/decisions", {"customer": {"email": email}, "topic": topic,
                                   "channel": channel}).get_json()


def test_bounce_suppresses_until_lifted(api):
    api.customer("bouncy@example.com")
    r = api.post("/suppressions", {"address": "Bouncy@example.com", "channel": "email",
                                   "reason": "hard_bounce"})
    assert r.status_code == 201
    suppression = r.get_json()
    assert decide(api, "bouncy@example.com")["reason"] == "suppressed"
    again = api.post("/suppressions", {"address": "bouncy@example.com", "channel": "email",
                                       "reason": "hard_bounce"})
    assert again.get_json()["id"] == suppression["id"]
    listed = api.get(f"/customers/{suppression['customer']}/suppressions").get_json()
    assert [s["id"] for s in listed["items"]] == [suppression["id"]]
    r = api.delete(f"/suppressions/{suppression['id']}")
    assert r.status_code == 200 and r.get_json()["lifted_at"]
    assert decide(api, "bouncy@example.com")["reason"] == "required_service"
    assert api.delete("/suppressions/999999").status_code == 404


def test_suppression_input_errors(api):
    c = api.customer("s@example.com")
    r = api.post("/suppressions", {"channel": "email", "reason": "manual"})
    assert field_errors(r) == {"address": "exactly_one"}
    r = api.post("/suppressions", {"address": "x@example.com", "channel": "email",
                                   "reason": "manual"})
    assert r.status_code == 422 and field_errors(r) == {"address": "unknown_customer"}
    r = api.post("/suppressions", {"address": "wallet-1", "channel": "wallet", "reason": "manual"})
    assert field_errors(r) == {"address": "address_not_applicable"}
    r = api.post("/suppressions", {"customer": {"id": c.public_id}, "channel": "email",
                                   "reason": "spite"})
    assert field_errors(r) == {"reason": "enum"}
    r = api.post("/suppressions", {"customer": {"id": c.public_id}, "channel": "wallet",
                                   "reason": "manual"})
    assert r.status_code == 201


@pytest.mark.parametrize("body, keyword", [
    ("STOP", "STOP"), ("stop", "STOP"), ("  Stop please", "STOP"), ("STOPALL", "STOPALL"),
    ("unsubscribe", "UNSUBSCRIBE"), ("Cancel", "CANCEL"), ("end", "END"), ("QUIT", "QUIT"),
    ("revoke", "REVOKE"), ("opt out", "OPT OUT"), ("OPT-OUT", "OPT OUT"), ("arrêt", "ARRET"),
    ("ARRET merci", "ARRET"), ("Arrêt", "ARRET"),
    ("please stop", None), ("stopping by later", None), ("hello", None), ("", None),
    ("optimal", None),
])
def test_stop_keywords(body, keyword):
    assert stop_keyword(body) == keyword


def test_inbound_stop_withdraws_every_sms(api):
    c = api.customer("sms@example.com", phone="+33633333333")
    api.consent(c, "offers", "sms", "granted")
    assert decide(api, "sms@example.com", "offers", "sms")["decision"] == "send"
    r = api.post("/inbound/sms", {"from": "+33 6 33 33 33 33", "body": "Arrêt"})
    assert r.status_code == 200
    assert r.get_json() == {"understood": "ARRET", "action": "withdrawn_sms",
                            "customer": c.public_id}
    answer = decide(api, "sms@example.com", "offers", "sms")
    assert answer["reason"] == "channel_off" and answer["evidence"]["source"] == "sms"
    assert decide(api, "sms@example.com", "offers", "email")["reason"] == "not_consented"
    r = api.post("/inbound/sms", {"from": "+33633333333", "body": "thanks!"})
    assert r.get_json()["understood"] is None and r.get_json()["action"] == "ignored"
    r = api.post("/inbound/sms", {"from": "+33699999999", "body": "STOP"})
    assert r.get_json()["action"] == "unknown_sender"
    r = api.post("/inbound/sms", {"from": "+33699999999"})
    assert field_errors(r) == {"body": "required"}


def test_unsubscribe_links_and_headers(api):
    c = api.customer("links@example.com")
    r = api.post("/unsubscribe-links", {"customer": {"id": c.public_id},
                                        "topic": "newsletter", "channel": "email"})
    assert r.status_code == 200
    body = r.get_json()
    assert body["url"].startswith("http://localhost/u/")
    assert body["headers"]["List-Unsubscribe"] == f"<{body['url']}>"
    assert body["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    page = api.client.get(body["url"].removeprefix("http://localhost"))
    assert page.status_code == 200  # GET never unsubscribes; it shows the page
    r = api.post("/unsubscribe-links", {"customer": {"id": c.public_id}, "topic": "nope",
                                        "channel": "email"})
    assert field_errors(r) == {"topic": "unknown_topic"}
    r = api.post("/unsubscribe-links", {"customer": {"id": "cus_x"}, "topic": "newsletter",
                                        "channel": "email"})
    assert field_errors(r) == {"customer": "unknown_customer"}


def test_a_stop_reply_keeps_the_number_out_of_the_append_only_ledger(api, session):
    from sqlalchemy import select

    from portal.models.consent import ConsentEvent, ConsentProof

    c = api.customer("ledger-sms@example.com", phone="+33644444444")
    api.post("/inbound/sms", {"from": "+33644444444", "body": "STOP"})
    event = session.scalars(select(ConsentEvent).where(ConsentEvent.customer_id == c.id)
                            .order_by(ConsentEvent.id.desc())).first()
    assert event is not None and event.source == "sms"
    assert "4444" not in event.actor  # the ledger cannot be rewritten at erasure
    proof = session.get(ConsentProof, event.id)
    assert proof is not None and "+33644444444" in (proof.user_agent or "")


def test_minting_unsubscribe_links_needs_links_write(api):
    """An unsubscribe link withdraws consent when followed: a key that may only read
    decisions cannot mint one."""
    c = api.customer("scoped@example.com")
    body = {"customer": {"id": c.public_id}, "topic": "newsletter", "channel": "email"}
    reader = make_key(api.app, "decisions:read", name="reader")
    refused = api.post("/unsubscribe-links", body, key=reader)
    assert refused.status_code == 403
    assert refused.mimetype == "application/problem+json"
    assert refused.get_json()["required_scopes"] == ["links:write"]
    assert 'scope="links:write"' in refused.headers["WWW-Authenticate"]
    # the reader still reads decisions
    assert api.post("/decisions", body, key=reader).status_code == 200
    minter = make_key(api.app, "links:write", name="minter")
    made = api.post("/unsubscribe-links", body, key=minter)
    assert made.status_code == 200 and "/u/" in made.get_json()["url"]
    spec = api.client.get("/api/v1/openapi.json").get_json()
    op = spec["paths"]["/api/v1/unsubscribe-links"]["post"]
    assert op["security"] == [{"bearer": ["links:write"]}]
    assert "links:write" in spec["components"]["securitySchemes"]["bearer"]["description"]
