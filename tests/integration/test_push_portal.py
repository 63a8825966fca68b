"""The web push opt-in endpoints through the Flask client: subscribe, change topics, leave,
precise errors for bad input, an anonymous visitor's choices joining their account at sign-in
(most restrictive first), and web push consent in the matrix and the history."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from portal import create_app
from portal.models.consent import ConsentEvent, ConsentState
from portal.push.models import PushSubscription
from portal.push.webpush import generate_vapid_keys
from portal.services import accounts
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from tests.conftest import app_config, submit
from tests.support.fake_push_service import make_fake_subscription

KEYS = generate_vapid_keys()
PASSWORD = "correct horse 1"
ORIGIN = "https://push.example.net"


@pytest.fixture
def app(connection, tmp_path):
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                 VAPID_PRIVATE_KEY=KEYS.private_pem))


@pytest.fixture
def customer(session):
    c = accounts.create_customer(session, "ann@example.com", password=PASSWORD, locale="en")
    accounts.mark_email_verified(session, c, "ann@example.com")
    session.commit()
    return c


def token(client, page="/push"):
    html = client.get(page).get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def call(client, method, body, path="/push/subscriptions", csrf=True, **kw):
    headers = {"X-CSRFToken": token(client)} if csrf else {}
    return client.open(path, method=method, json=body, headers=headers, **kw)


def new_sub(origin=ORIGIN):
    return make_fake_subscription(origin)[0]


def sign_in(client):
    r = submit(client, "/login", {"email": "ann@example.com", "password": PASSWORD})
    assert r.status_code == 302


def customer_state(session, customer, topic):
    session.expire_all()
    row = session.get(ConsentState, (customer.id, topic, "web_push"))
    return row.state if row else None


def test_the_panel_explains_and_offers_only_web_push_topics(client):
    html = client.get("/push").get_data(as_text=True)
    assert "data-push-panel" in html and f'data-vapid-key="{KEYS.public_key}"' in html
    offered = re.findall(r'name="push_topic" value="([a-z_]+)"', html)
    assert offered == ["newsletter", "offers", "events"]
    assert "<script>" not in html


def test_without_a_key_push_shows_as_unavailable(connection, tmp_path):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection))
    html = app.test_client().get("/push").get_data(as_text=True)
    assert "Browser notifications are not available" in html
    assert "data-push-form" not in html


def test_service_worker_is_served_from_the_root(client):
    r = client.get("/sw.js")
    assert r.status_code == 200 and r.mimetype == "application/javascript"
    assert r.headers["Service-Worker-Allowed"] == "/"
    assert b"showNotification" in r.data
    # Its renewal asks for the CSRF token first, and sends it.
    assert b"'/push/csrf-token'" in r.data and b"'X-CSRFToken': token" in r.data


def test_anonymous_subscribe_change_topics_and_leave(client, session):
    sub = new_sub()
    r = call(client, "POST", {"subscription": sub, "topics": ["offers", "events"]})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["topics"] == ["offers", "events"]
    assert "carnet_device=" in r.headers["Set-Cookie"]
    assert "HttpOnly" in r.headers["Set-Cookie"]
    row = session.scalars(select(PushSubscription)).one()
    assert row.customer_id is None and row.device_hash
    r = call(client, "POST", {"subscription": sub, "topics": ["events"]})
    assert r.status_code == 200 and r.get_json()["topics"] == ["events"]
    events = session.scalars(select(ConsentEvent).where(
        ConsentEvent.push_subscription_id == row.id).order_by(ConsentEvent.id)).all()
    assert [(e.topic_key, e.state) for e in events] == [
        ("offers", "granted"), ("events", "granted"), ("offers", "withdrawn")]
    # What the page's script asks on load to re-sync.
    from portal.push.subscriptions import sha256
    state = client.get(f"/push/subscription?endpoint_hash={sha256(sub['endpoint'])}").get_json()
    assert state["known"] and state["mine"] and state["topics"] == ["events"]
    r = call(client, "DELETE", {"endpoint": sub["endpoint"]})
    assert r.status_code == 204
    session.expire_all()
    assert session.get(PushSubscription, row.id).expired_reason == "left"
    assert call(client, "DELETE", {"endpoint": sub["endpoint"]}).status_code == 404


@pytest.mark.parametrize("body, status, field, code", [
    ({"subscription": {"endpoint": "https://x.example/1"}, "topics": []}, 422,
     "subscription.keys", "invalid_subscription"),
    ({"subscription": {**new_sub(), "endpoint": "ftp://push.example.net/1"}}, 422,
     "subscription.endpoint", "invalid_subscription"),
    ({"subscription": new_sub("http://push.example.net")}, None, None, None),
    ({"subscription": new_sub(), "topics": ["surveys"]}, 422, "topics[0]",
     "channel_not_offered"),
    ({"subscription": new_sub(), "topics": ["nope"]}, 422, "topics[0]", "unknown_topic"),
    ({"subscription": new_sub(), "topics": "offers"}, 422, "topics", "type"),
    ({"subscription": new_sub(), "extra": 1}, 422, "extra", "unknown_field"),
    ({"subscription": "x"}, 422, "subscription", "type"),
    ([], 422, "body", "type"),
])
def test_bad_input_gets_a_precise_json_error(client, body, status, field, code):
    r = call(client, "POST", body)
    if status is None:  # http endpoints are accepted in development and tests only
        assert r.status_code == 201
        return
    assert r.status_code == status
    assert r.mimetype == "application/problem+json"
    error = r.get_json()["errors"][0]
    assert (error["field"], error["code"]) == (field, code)


def test_transport_errors_are_json_too(client):
    assert call(client, "POST", {"subscription": new_sub()}, csrf=False).status_code == 400
    r = client.post("/push/subscriptions", data="{", content_type="application/json",
                    headers={"X-CSRFToken": token(client)})
    assert r.status_code == 400 and r.get_json()["type"].endswith("/malformed-json")
    r = client.post("/push/subscriptions", data="x=1", headers={"X-CSRFToken": token(client)})
    assert r.status_code == 415
    big = {"subscription": new_sub(), "topics": ["x" * 10_000]}
    assert call(client, "POST", big).status_code == 413


def test_anonymous_choices_join_the_account_at_sign_in(client, session, customer):
    catalog = get_catalog(session)
    record_consent(session, customer, "offers", "web_push", "granted", Proof("portal", "t"),
                   catalog=catalog)
    record_consent(session, customer, "events", "web_push", "withdrawn", Proof("portal", "t"),
                   catalog=catalog)
    session.commit()
    sub = new_sub()
    call(client, "POST", {"subscription": sub, "topics": ["offers", "newsletter", "events"]})
    call(client, "POST", {"subscription": sub, "topics": ["newsletter", "events"]})
    # Device: newsletter granted, offers withdrawn, events granted.
    sign_in(client)
    assert customer_state(session, customer, "offers") == "withdrawn"      # device beats
    assert customer_state(session, customer, "newsletter") == "granted"    # customer had none
    assert customer_state(session, customer, "events") == "withdrawn"      # customer's stays
    row = session.scalars(select(PushSubscription)).one()
    assert row.customer_id == customer.id
    merged = session.scalars(select(ConsentEvent).where(
        ConsentEvent.customer_id == customer.id, ConsentEvent.source == "web_push")).all()
    assert sorted((e.topic_key, e.state) for e in merged) == [
        ("newsletter", "granted"), ("offers", "withdrawn")]

    page = client.get("/preferences").get_data(as_text=True)
    assert re.search(r'name="c:newsletter:web_push"\s+checked', page)
    assert not re.search(r'name="c:offers:web_push"\s+checked', page)
    assert re.search(r'name="push_topic" value="newsletter" checked', page)
    history = client.get("/preferences/history").get_data(as_text=True)
    assert "you agreed to Newsletter by Browser notifications (in your browser)" in history
    assert "you withdrew Offers and promotions by Browser notifications (in your browser)" \
        in history


def test_signed_in_subscribe_records_customer_consent(client, session, customer):
    sign_in(client)
    r = call(client, "POST", {"subscription": new_sub(), "topics": ["offers"]})
    assert r.status_code == 201
    assert customer_state(session, customer, "offers") == "granted"
    event = session.scalars(select(ConsentEvent).where(
        ConsentEvent.customer_id == customer.id)).one()
    assert (event.source, event.actor) == ("web_push", f"customer:{customer.public_id}")


def test_a_visitor_cannot_take_over_an_account_subscription(client, app, session, customer):
    sign_in(client)
    sub = new_sub()
    call(client, "POST", {"subscription": sub, "topics": ["offers"]})
    stranger = app.test_client()
    r = call(stranger, "POST", {"subscription": sub, "topics": []})
    assert r.status_code == 409
    assert customer_state(session, customer, "offers") == "granted"


def test_a_subscription_posted_later_while_signed_in_is_adopted(client, session, customer):
    sub = new_sub()
    call(client, "POST", {"subscription": sub, "topics": ["newsletter"]})
    client.delete_cookie("carnet_device")
    sign_in(client)
    assert customer_state(session, customer, "newsletter") is None
    r = call(client, "POST", {"subscription": sub})  # the page's re-sync, no topics
    assert r.status_code == 200 and r.get_json()["topics"] == ["newsletter"]
    assert customer_state(session, customer, "newsletter") == "granted"


def renew(client, old_endpoint, subscription, csrf=True):
    """What the service worker does on ``pushsubscriptionchange``: it has no page, so it asks
    for the CSRF token, then posts with the browser's cookies."""
    headers = {}
    if csrf:
        answer = client.get("/push/csrf-token")
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
        assert "Access-Control-Allow-Origin" not in answer.headers  # no other site reads it
        headers["X-CSRFToken"] = answer.get_json()["csrf_token"]
    return client.post("/push/subscriptions/renew", json={"old_endpoint": old_endpoint,
                                                          "subscription": subscription},
                       headers=headers)


def snapshot(session):
    session.expire_all()
    return sorted((s.endpoint, s.p256dh, s.auth, s.customer_id, s.expired_at)
                  for s in session.scalars(select(PushSubscription)))


def test_renewal_keeps_owner_and_choices(client, session):
    old = new_sub()
    call(client, "POST", {"subscription": old, "topics": ["offers"]})
    new = new_sub()
    r = renew(client, old["endpoint"], new)
    assert r.status_code == 204
    row = session.scalars(select(PushSubscription)).one()
    assert row.endpoint == new["endpoint"] and row.p256dh == new["keys"]["p256dh"]
    from portal.push.subscriptions import sha256
    state = client.get(f"/push/subscription?endpoint_hash={sha256(new['endpoint'])}").get_json()
    assert state["mine"] and state["topics"] == ["offers"]
    r = renew(client, old["endpoint"], new_sub())
    assert r.status_code == 404


def test_renewal_needs_the_csrf_token(client, session):
    old = new_sub()
    call(client, "POST", {"subscription": old, "topics": ["offers"]})
    before = snapshot(session)
    r = renew(client, old["endpoint"], new_sub(), csrf=False)
    assert r.status_code == 400 and r.get_json()["type"].endswith("/csrf")
    r = client.post("/push/subscriptions/renew", json={"old_endpoint": old["endpoint"],
                                                       "subscription": new_sub()},
                    headers={"X-CSRFToken": "forged"})
    assert r.status_code == 400
    assert snapshot(session) == before


def test_another_browser_cannot_renew_a_subscription_to_its_own_endpoint(app, client, session):
    """Knowing someone's endpoint is not enough to have their notifications sent elsewhere."""
    victim = new_sub()
    call(client, "POST", {"subscription": victim, "topics": ["offers"]})
    stranger = app.test_client()
    call(stranger, "POST", {"subscription": new_sub(), "topics": []})  # has a device cookie
    before = snapshot(session)
    for caller in (stranger, app.test_client()):
        r = renew(caller, victim["endpoint"], new_sub())
        assert r.status_code == 404 and r.mimetype == "application/problem+json"
    assert snapshot(session) == before


def test_only_its_customer_renews_an_account_subscription(app, client, session, customer):
    sign_in(client)
    old = new_sub()
    assert call(client, "POST", {"subscription": old, "topics": ["offers"]}).status_code == 201
    other = accounts.create_customer(session, "bob@example.com", password=PASSWORD,
                                     locale="en")
    accounts.mark_email_verified(session, other, "bob@example.com")
    session.commit()
    bob = app.test_client()
    assert submit(bob, "/login", {"email": "bob@example.com",
                                  "password": PASSWORD}).status_code == 302
    before = snapshot(session)
    for caller in (bob, app.test_client()):
        assert renew(caller, old["endpoint"], new_sub()).status_code == 404
    assert snapshot(session) == before
    new = new_sub()
    assert renew(client, old["endpoint"], new).status_code == 204
    row = session.scalars(select(PushSubscription)).one()
    assert (row.endpoint, row.customer_id) == (new["endpoint"], customer.id)
    assert customer_state(session, customer, "offers") == "granted"


PRIVATE_ENDPOINTS = [
    "https://127.0.0.1/", "https://169.254.169.254/latest/meta-data/", "https://[::1]/",
    "https://2130706433/", "https://localhost/", "https://0x7f.1/push/a",
    "https://[::ffff:10.0.0.1]/", "https://10.1.2.3:8443/push/a", "https://push.local/a",
    "https://metadata.google.internal/", "https://push.example.net:22/a",
]


@pytest.mark.parametrize("endpoint", PRIVATE_ENDPOINTS)
def test_a_push_endpoint_on_a_private_network_is_refused(client, session, endpoint):
    r = call(client, "POST", {"subscription": {**new_sub(), "endpoint": endpoint},
                              "topics": ["offers"]})
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    error = r.get_json()["errors"][0]
    assert (error["field"], error["code"]) == ("subscription.endpoint", "refused_destination")
    assert error["message"].startswith("This browser's push service address")
    assert session.scalars(select(PushSubscription)).all() == []
    assert session.scalars(select(ConsentEvent)).all() == []


def test_the_refusal_is_in_the_visitors_language(client):
    r = client.post("/push/subscriptions",
                    json={"subscription": {**new_sub(), "endpoint": "https://127.0.0.1/"}},
                    headers={"X-CSRFToken": token(client), "Accept-Language": "fr"})
    assert r.status_code == 422
    assert "réseau privé" in r.get_json()["detail"]


def test_a_renewal_to_a_private_endpoint_is_refused(client, session):
    old = new_sub()
    call(client, "POST", {"subscription": old, "topics": ["offers"]})
    before = snapshot(session)
    r = renew(client, old["endpoint"], {**new_sub(), "endpoint": "https://169.254.169.254/"})
    assert r.status_code == 422
    assert r.get_json()["errors"][0]["code"] == "refused_destination"
    assert snapshot(session) == before


def test_the_setting_lets_a_local_push_service_through(connection, tmp_path, session):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                VAPID_PRIVATE_KEY=KEYS.private_pem,
                                WEBHOOK_ALLOW_PRIVATE_NETWORKS=True))
    client = app.test_client()
    local = new_sub("http://127.0.0.1:8990")
    assert call(client, "POST", {"subscription": local}).status_code == 201
    # Port, userinfo and scheme rules hold whatever the setting.
    r = call(client, "POST", {"subscription": {**new_sub(), "endpoint": "https://127.0.0.1:22/"}})
    assert r.status_code == 422 and r.get_json()["errors"][0]["reason"] == "port"


def test_beacons_are_validated(client):
    r = client.post("/push/beacons", json={"message": "pm_x", "subscription": "0" * 64,
                                           "event": "displayed"})
    assert r.status_code == 404
    r = client.post("/push/beacons", json={"message": "x", "subscription": "0" * 64,
                                           "event": "displayed"})
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "message"
    r = client.post("/push/beacons", json={"message": "pm_x", "subscription": "0" * 64,
                                           "event": "opened"})
    assert r.get_json()["errors"][0]["field"] == "event"


def test_beacons_are_rate_limited(connection, tmp_path):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                PUSH_BEACON_RATE_LIMIT="2/60"))
    client = app.test_client()
    body = {"message": "pm_x", "subscription": "0" * 64, "event": "clicked"}
    codes = [client.post("/push/beacons", json=body).status_code for _ in range(3)]
    assert codes == [404, 404, 429]
