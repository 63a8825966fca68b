"""The worker killed (SIGKILL) in the middle of a delivery: after a restart everything is
delivered, at least once, and per endpoint in the order of the change feed.

The worker runs as a real ``flask --app app worker`` process against a real database and
real local receivers. A killed worker leaves its lease behind; leases run out after two
minutes, so instead of waiting, the test moves them into the past, which is what the clock
would have done.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

from portal.core.db import get_engine, new_session
from portal.push import subscriptions as push
from portal.push.models import PushDelivery
from portal.push.webpush import generate_vapid_keys
from portal.services.catalog import get_catalog
from tests.faults.helpers import WorkerProcess, dispose, make_live_app, wait_for
from tests.support.api_client import make_key
from tests.support.fake_push_service import Answer, FakePushService
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.slow


def expire_leases(app, table: str) -> None:
    """What two minutes of waiting would do to the dead worker's claims."""
    with get_engine(app).begin() as conn:
        conn.execute(text(f"UPDATE {table} SET leased_until = :past "
                          f"WHERE leased_until IS NOT NULL"),
                      {"past": "2000-01-01 00:00:00"})


@pytest.fixture
def app(db_url, tmp_path):
    made = make_live_app(db_url, tmp_path)
    yield made
    dispose(made)


@pytest.fixture
def receiver():
    running = WebhookReceiver().start()
    yield running
    running.stop()


def api_post(client, key, path, body):
    r = client.post("/api/v1" + path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code in (201, 202), r.get_json()
    return r.get_json()


def test_webhooks_resume_after_kill_in_order_never_missing(app, db_url, receiver, tmp_path):
    app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = True  # the receiver is on 127.0.0.1
    client, key = app.test_client(), make_key(app)
    hook = api_post(client, key, "/webhooks", {"url": receiver.url, "events": ["*"]})
    receiver.secret = hook["secret"]
    start = hook["cursor"]
    settings = {"WEBHOOK_POLL_SECONDS": 0.1, "WEBHOOK_TIMEOUT_SECONDS": 60,
                "WEBHOOK_RETRY_BASE_SECONDS": 0, "WEBHOOK_ALLOW_PRIVATE_NETWORKS": True}
    first = WorkerProcess(db_url, tmp_path / "worker1.log", **settings).start()
    try:
        for i in range(3):
            api_post(client, key, "/customers", {"email": f"before{i}@example.com"})
        wait_for(lambda: len(receiver.received) >= 3, what="the first deliveries")
        receiver.stall_next(1)
        for i in range(9):
            api_post(client, key, "/customers", {"email": f"after{i}@example.com"})
        wait_for(receiver.stalled.is_set, what="the receiver to hold a delivery")
        first.kill()
    finally:
        first.stop()
    receiver.release()
    delivered_before_restart = len(receiver.received)
    assert delivered_before_restart == 4, first.output()

    expire_leases(app, "webhooks")
    second = WorkerProcess(db_url, tmp_path / "worker2.log", **settings).start()
    try:
        api_post(client, key, "/customers", {"email": "later@example.com"})

        def feed() -> list[str]:
            # On PostgreSQL the feed holds back rows while older transactions may commit.
            events = client.get(f"/api/v1/events?after={start}&limit=100", headers={
                "Authorization": f"Bearer {key}"}).get_json()["events"]
            return [e["id"] for e in events] if len(events) == 13 else []

        expected = wait_for(feed, what="the 13 changes in the feed")

        def all_arrived() -> bool:
            return set(expected) <= {e["id"] for e in receiver.received}

        wait_for(all_arrived, what="every change to arrive after the restart")
    finally:
        second.stop()
    got = [e["id"] for e in receiver.received]
    first_seen = list(dict.fromkeys(got))
    assert first_seen == expected  # none missing, none overtaken
    positions = [expected.index(i) for i in got]
    assert positions == sorted(positions)  # a repeat only ever re-sends the one in flight
    assert got.count(expected[3]) == 2  # the held one was sent again (at least once)
    assert len(got) == len(expected) + 1
    assert receiver.rejected == []


def test_web_push_resumes_after_kill_and_every_browser_gets_it(app, db_url, tmp_path):
    keys = generate_vapid_keys()
    with FakePushService() as service:
        endpoints = []
        session = new_session(app)
        with session.begin():
            catalog = get_catalog(session)
            for _ in range(5):
                raw = service.new_subscription(application_server_key=keys.public_key)
                sub, _ = push.save_subscription(
                    session, push.check_subscription(raw, allow_http=True, allow_private=True),
                    customer=None,
                    device_hash=push.sha256(raw["endpoint"]), user_agent="test", locale="en")
                push.set_topics(session, catalog, sub, None, ["offers"],
                                push.Proof("web_push", "test"))
                endpoints.append(raw["endpoint"])
        session.close()
        service.script(endpoints[2], Answer(stall=True), Answer())
        client, key = app.test_client(), make_key(app)
        message = api_post(client, key, "/push/messages", {
            "topic": "offers", "audience": "all", "title": "Sale", "body": "Half price",
            "url": "/offers", "ttl": 3600})
        # The local push service listens on 127.0.0.1, a private address: allowed here.
        settings = {"VAPID_PRIVATE_KEY": keys.private_pem, "PUSH_POLL_SECONDS": 0.1,
                    "PUSH_TIMEOUT_SECONDS": 60, "VAPID_SUBJECT": "mailto:faults@carnet.example",
                    "WEBHOOK_ALLOW_PRIVATE_NETWORKS": True}
        first = WorkerProcess(db_url, tmp_path / "push1.log", **settings).start()
        try:
            wait_for(service.stalled.is_set, what="the push service to hold a message")
            wait_for(lambda: len(service.records) == 5, what="the other four sends")
            first.kill()
        finally:
            first.stop()
        service.release_stalled()

        def statuses() -> list[str]:
            s = new_session(app)
            with s.begin():
                found = list(s.scalars(select(PushDelivery.status)))
            s.close()
            return found

        # Sent on the wire, but the dead worker never recorded it: still queued, not lost.
        assert statuses() == ["queued"] * 5, first.output()
        expire_leases(app, "push_deliveries")
        second = WorkerProcess(db_url, tmp_path / "push2.log", **settings).start()
        try:
            wait_for(lambda: statuses() == ["sent"] * 5, what="every delivery to be sent")
        finally:
            second.stop()
        paths = ["/" + e.split("/", 3)[3] for e in endpoints]
        got = [r for r in service.records if r.status == 201]
        assert {r.path for r in got} == set(paths)  # every browser, at least once
        assert all(json.loads(r.plaintext)["id"] == message["id"] for r in got)
        counts = client.get(f"/api/v1/push/messages/{message['id']}",
                            headers={"Authorization": f"Bearer {key}"}).get_json()["counts"]
        assert counts["sent"] == 5 and counts["queued"] == 0
