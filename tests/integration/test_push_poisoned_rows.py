"""One poisoned row never stops the push jobs: a message whose stored data the worker's code
cannot handle fails alone, and the other messages are fanned out and delivered in the same
run. The rows are written straight into the tables, as a bug or a manual edit could."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import select

from portal import create_app
from portal.core.db import new_session, utcnow
from portal.outbox.worker import run_once
from portal.push import subscriptions as push
from portal.push.models import PushDelivery, PushMessage
from portal.push.webpush import generate_vapid_keys
from portal.services.catalog import get_catalog
from tests.conftest import app_config
from tests.support.api_client import Api
from tests.support.fake_push_service import FakePushService

KEYS = generate_vapid_keys()
SUBJECT = "mailto:push-tests@carnet.example"


@pytest.fixture(scope="module")
def service():
    with FakePushService() as running:
        yield running


@pytest.fixture
def api(connection, tmp_path, client):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                VAPID_PRIVATE_KEY=KEYS.private_pem, VAPID_SUBJECT=SUBJECT,
                                WEBHOOK_ALLOW_PRIVATE_NETWORKS=True))  # the service is local
    return Api(app, app.test_client())


def subscribe(api, service):
    raw = service.new_subscription(application_server_key=KEYS.public_key)
    session = new_session(api.app)
    with session.begin():
        sub, _ = push.save_subscription(
            session, push.check_subscription(raw, allow_http=True, allow_private=True),
            customer=None,
            device_hash=push.sha256(raw["endpoint"]), user_agent="test", locale="en")
        push.set_topics(session, get_catalog(session), sub, None, ["offers"],
                        push.Proof("web_push", "test"))
    session.close()
    return raw


def poisoned_message(api, **data):
    session = new_session(api.app)
    with session.begin():
        fields = {"audience": "all", "localized": {}, **data}
        message = PushMessage(public_id="psh_" + secrets.token_urlsafe(8), topic_key="offers",
                              title="Broken", body="Broken", ttl=3600, urgency="normal",
                              created_at=utcnow(), fanout_cursor=0, **fields)
        session.add(message)
    session.close()
    return message.id


def send(api):
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "Sale",
                                    "body": "Half price", "ttl": 3600})
    assert r.status_code == 202, r.get_json()
    return r.get_json()["id"]


def statuses(api):
    session = new_session(api.app)
    with session.begin():
        found = {(m.public_id, d.status, d.reason) for d, m in session.execute(
            select(PushDelivery, PushMessage).join(
                PushMessage, PushMessage.id == PushDelivery.message_id))}
    session.close()
    return found


def jobs(api):
    return run_once(api.app, ["push.fan_out", "push.deliver"])


def test_a_message_whose_fan_out_raises_does_not_stop_the_others(api, service):
    subscribe(api, service)
    broken = poisoned_message(api, audience=["not", "a", "mapping"])
    good = send(api)
    assert jobs(api)["push.deliver"] == {"sent": 1}
    assert statuses(api) == {(good, "sent", None)}
    session = new_session(api.app)
    with session.begin():
        message = session.get(PushMessage, broken)
        assert message is not None and message.fanned_out_at is not None  # given up
    session.close()
    assert jobs(api)["push.fan_out"] == 0


def test_a_delivery_that_cannot_be_prepared_fails_alone(api, service):
    subscribe(api, service)
    poisoned_message(api, localized={"en": "not a mapping"})
    good = send(api)
    assert jobs(api)["push.deliver"] == {"sent": 1}
    assert {(s, r) for public_id, s, r in statuses(api) if public_id != good} == {
        ("failed", "error")}
    assert (good, "sent", None) in statuses(api)
