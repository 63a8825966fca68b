"""Sending browser notifications through the API, delivered by the worker to a real local push
service that checks VAPID and decrypts every message."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from portal import create_app
from portal.core.db import new_session, utcnow
from portal.outbox.worker import run_once
from portal.push import jobs as push_worker
from portal.push import subscriptions as push
from portal.push.models import PushDelivery, PushMessage, PushSubscription
from portal.push.webpush import generate_vapid_keys
from portal.services.catalog import get_catalog
from tests.conftest import app_config
from tests.support.api_client import Api, field_errors, make_key
from tests.support.fake_push_service import Answer, FakePushService

KEYS = generate_vapid_keys()
SUBJECT = "mailto:push-tests@carnet.example"


@pytest.fixture(scope="module")
def service():
    with FakePushService() as running:
        yield running


@pytest.fixture
def app(connection, tmp_path):
    # The local push service listens on 127.0.0.1, a private address: allowed here only.
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                 VAPID_PRIVATE_KEY=KEYS.private_pem, VAPID_SUBJECT=SUBJECT,
                                 WEBHOOK_ALLOW_PRIVATE_NETWORKS=True))


@pytest.fixture
def api(app, client):
    return Api(app, client)


def browser(api, service, *, customer=None, topics=(), key=KEYS.public_key):
    """A browser subscribed on the fake push service, saved as the portal would save it."""
    raw = service.new_subscription(application_server_key=key)
    session = new_session(api.app)
    with session.begin():
        catalog = get_catalog(session)
        owner = session.get(type(customer), customer.id) if customer is not None else None
        sub, _ = push.save_subscription(
            session, push.check_subscription(raw, allow_http=True, allow_private=True),
            customer=owner,
            device_hash=None if owner else push.sha256(raw["endpoint"]), user_agent="test",
            locale="en")
        if topics:
            push.set_topics(session, catalog, sub, owner, list(topics),
                            push.Proof("web_push", "test"))
    session.close()
    return raw


def received(service, raw):
    path = "/" + raw["endpoint"].split("/", 3)[3]
    return [r for r in service.records if r.path == path]


def deliver(app, now=None):
    """One pass of the worker's two push jobs (at ``now`` when given)."""
    if now is None:
        run_once(app, ["push.fan_out"])
    else:
        push_worker.fan_out(app, now)
    return push_worker.deliver(app, now=now)


def counts(api, message_id):
    r = api.get(f"/push/messages/{message_id}")
    assert r.status_code == 200
    return r.get_json()["counts"]


def send(api, **fields):
    body = {"topic": "offers", "audience": "all", "title": "Sale", "body": "Half price",
            "url": "/offers", "ttl": 3600, **fields}
    r = api.post("/push/messages", body)
    assert r.status_code == 202, r.get_json()
    return r.get_json()["id"]


def test_only_consented_browsers_receive_it_in_their_language(api, service):
    service.reset_records()
    french = api.customer("fr@example.com", locale="fr")
    api.consent(french, "offers", "web_push", "granted")
    refused = api.customer("no@example.com")
    api.consent(refused, "offers", "web_push", "withdrawn")
    to_french = browser(api, service, customer=french)
    to_refused = browser(api, service, customer=refused)
    anonymous_yes = browser(api, service, topics=["offers"])
    anonymous_other = browser(api, service, topics=["events"])
    message_id = send(api, localized={"fr": {"title": "Soldes", "body": "Moitié prix"}},
                      urgency="high", collapse_topic="sale-1")
    assert deliver(api.app) == {"sent": 2}

    (french_copy,) = received(service, to_french)
    assert json.loads(french_copy.plaintext) == {
        "id": message_id, "title": "Soldes", "body": "Moitié prix", "url": "/offers",
        "tag": "sale-1"}
    assert french_copy.claims["sub"] == SUBJECT
    assert french_copy.claims["aud"] == service.origin
    assert french_copy.headers["urgency"] == "high" and french_copy.headers["topic"] == "sale-1"
    assert 0 < int(french_copy.headers["ttl"]) <= 3600
    (anonymous_copy,) = received(service, anonymous_yes)
    assert json.loads(anonymous_copy.plaintext)["title"] == "Sale"
    assert received(service, to_refused) == [] and received(service, anonymous_other) == []

    summary = api.get(f"/push/messages/{message_id}").get_json()
    assert summary["status"] == "done"
    assert summary["counts"]["sent"] == 2 and summary["counts"]["skipped"] == 2
    assert summary["skipped_reasons"] == {"withdrawn": 1, "not_consented": 1}


def test_customer_audience_and_displays_and_clicks(api, service):
    service.reset_records()
    ann = api.customer("ann@example.com")
    api.consent(ann, "newsletter", "web_push", "granted")
    raw = browser(api, service, customer=ann)
    bob = api.customer("bob@example.com")
    api.consent(bob, "newsletter", "web_push", "granted")
    message_id = send(api, topic="newsletter",
                      audience={"customers": [ann.public_id, bob.public_id]})
    deliver(api.app)
    beacon = {"message": message_id, "subscription": push.sha256(raw["endpoint"])}
    client = api.app.test_client()
    assert client.post("/push/beacons", json={**beacon, "event": "displayed"}).status_code == 204
    assert client.post("/push/beacons", json={**beacon, "event": "clicked"}).status_code == 204
    assert counts(api, message_id) == {"queued": 0, "sent": 1, "failed": 0, "expired": 0,
                                       "skipped": 0, "displayed": 1, "clicked": 1,
                                       "unreachable": 1}


@pytest.mark.parametrize("status", [404, 410])
def test_gone_subscriptions_are_expired(api, service, status):
    gone = browser(api, service, topics=["offers"])
    kept = browser(api, service, topics=["offers"])
    service.script(gone["endpoint"], Answer(status))
    message_id = send(api)
    assert deliver(api.app) == {"expired": 1, "sent": 1}
    session = new_session(api.app)
    rows = {s.endpoint: s for s in session.scalars(select(PushSubscription))}
    assert rows[gone["endpoint"]].expired_at is not None
    assert rows[kept["endpoint"]].expired_at is None
    session.close()
    assert counts(api, message_id)["expired"] == 1
    second = send(api)
    deliver(api.app)
    assert counts(api, second)["sent"] == 1 and counts(api, second)["expired"] == 0


def test_rate_limited_waits_for_retry_after(api, service):
    raw = browser(api, service, topics=["offers"])
    service.script(raw["endpoint"], Answer(429, {"Retry-After": "120"}), Answer(201))
    message_id = send(api)
    now = utcnow()
    assert deliver(api.app, now) == {"queued": 1}
    assert push_worker.deliver(api.app, now + timedelta(seconds=100)) == {}
    assert push_worker.deliver(api.app, now + timedelta(seconds=121)) == {"sent": 1}
    assert counts(api, message_id)["sent"] == 1
    assert [r.status for r in received(service, raw)] == [429, 201]


def test_server_errors_are_retried_with_backoff(api, service):
    raw = browser(api, service, topics=["offers"])
    service.script(raw["endpoint"], Answer(500), Answer(503), Answer(201))
    message_id = send(api)
    now = utcnow()
    assert deliver(api.app, now) == {"queued": 1}
    assert push_worker.deliver(api.app, now + timedelta(seconds=31)) == {"queued": 1}
    assert push_worker.deliver(api.app, now + timedelta(seconds=32)) == {}
    assert push_worker.deliver(api.app, now + timedelta(seconds=92)) == {"sent": 1}
    assert counts(api, message_id)["sent"] == 1


def test_too_large_and_wrong_key_fail_without_retry(api, service, caplog):
    large = browser(api, service, topics=["offers"])
    service.script(large["endpoint"], Answer(413))
    browser(api, service, topics=["offers"], key=generate_vapid_keys().public_key)
    message_id = send(api)
    assert deliver(api.app) == {"failed": 2}
    session = new_session(api.app)
    reasons = sorted(d.reason for d in session.scalars(select(PushDelivery)))
    session.close()
    assert reasons == ["config_error", "too_large"]
    assert "check the VAPID key" in caplog.text
    assert counts(api, message_id)["failed"] == 2


def test_a_worker_killed_mid_send_loses_nothing(api, service):
    raw = browser(api, service, topics=["offers"])
    send(api)
    run_once(api.app, ["push.fan_out"])
    session = new_session(api.app)
    now = utcnow()
    with session.begin():  # a worker claims, then dies before sending
        from portal.push import messages as push_messages
        assert len(push_messages.claim_due(session, now, push_worker.policy(api.app))) == 1
    session.close()
    assert push_worker.deliver(api.app, now) == {}
    assert push_worker.deliver(api.app, now + timedelta(minutes=3)) == {"sent": 1}
    assert len(received(service, raw)) == 1


def test_oversized_payload_is_refused_before_queuing(api):
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "T",
                                    "body": "x" * 1000, "localized": {
                                        "fr": {"body": "é" * 1000, "title": "ü" * 200}}})
    assert r.status_code == 202
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "T",
                                    "body": "x" * 1000, "url": "https://e.example/" + "a" * 1980,
                                    "icon": "https://e.example/" + "b" * 1980})
    assert r.status_code == 422
    assert field_errors(r) == {"body": "payload_too_large"}
    session = new_session(api.app)
    assert len(session.scalars(select(PushMessage)).all()) == 1
    session.close()


def test_input_errors_and_scope(api):
    r = api.post("/push/messages", {"topic": "surveys", "audience": "all", "title": "T"})
    assert field_errors(r) == {"topic": "channel_not_offered"}
    r = api.post("/push/messages", {"topic": "offers", "audience": "some", "title": "T"})
    assert field_errors(r) == {"audience": "type"}
    r = api.post("/push/messages", {"topic": "offers", "audience": {"customers": ["cus_x"]},
                                    "title": "T"})
    assert field_errors(r) == {"audience.customers[0]": "unknown_customer"}
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "T",
                                    "urgency": "now", "ttl": -1, "url": "javascript:x"})
    assert set(field_errors(r)) == {"urgency", "ttl", "url"}
    other = make_key(api.app, "decisions:read", name="reader")
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "T"},
                 key=other)
    assert r.status_code == 403
    assert api.get("/push/messages/pm_nothing").status_code == 404


def test_documented_in_openapi(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert "post" in spec["paths"]["/api/v1/push/messages"]
    assert "get" in spec["paths"]["/api/v1/push/messages/{message_id}"]


def test_a_stored_subscription_to_a_private_address_is_refused_when_sending(
        connection, tmp_path, service):
    """A row written before the rule (or past it) is checked again when sending: with the
    setting off, nothing reaches the local push service, and the subscription is retired."""
    service.reset_records()
    strict = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                   VAPID_PRIVATE_KEY=KEYS.private_pem, VAPID_SUBJECT=SUBJECT))
    api = Api(strict, strict.test_client())
    raw = service.new_subscription(application_server_key=KEYS.public_key)
    session = new_session(strict)
    with session.begin():
        row = PushSubscription(
            public_id="psub_stored_earlier", endpoint=raw["endpoint"],
            endpoint_hash=push.sha256(raw["endpoint"]), p256dh=raw["keys"]["p256dh"],
            auth=raw["keys"]["auth"], device_hash=push.sha256("a device"), locale="en")
        session.add(row)
        session.flush()
        push.set_topics(session, get_catalog(session), row, None, ["offers"],
                        push.Proof("web_push", "test"))
    session.close()
    message_id = send(api)
    assert deliver(strict) == {"expired": 1}
    assert service.records == [] and service.connections_opened == 0
    session = new_session(strict)
    delivery = session.scalars(select(PushDelivery)).one()
    assert (delivery.status, delivery.reason) == ("expired", "refused_destination")
    port = raw["endpoint"].split(":")[2].split("/")[0]
    assert "127.0.0.1" not in delivery.error and port not in delivery.error
    stored = session.scalars(select(PushSubscription)).one()
    assert stored.expired_at is not None and stored.expired_reason == "refused_destination"
    session.close()
    assert counts(api, message_id)["expired"] == 1
    assert deliver(strict) == {}  # retired: the next messages skip it
