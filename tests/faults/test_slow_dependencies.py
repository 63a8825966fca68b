"""Outside services that hang or fail (webhook receivers, web push services): the worker
retries with backoff and records every attempt, and the portal and the API, which never
call those services inline, keep answering while the worker is stuck on one.

Nothing here times a request: "still answering" is shown by answers arriving while the
stalled delivery is provably still unrecorded, i.e. before the stall ended.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from sqlalchemy import select

from portal.core.db import new_session, utcnow
from portal.loyalty import ledger as loyalty
from portal.loyalty.program import load_program
from portal.models.api import Webhook, WebhookDelivery
from portal.outbox import worker
from portal.push import jobs as push_worker
from portal.push import subscriptions as push
from portal.push.models import PushDelivery
from portal.push.webpush import generate_vapid_keys
from portal.services.catalog import get_catalog
from portal.services.consent import Proof
from tests.conftest import CATALOG
from tests.faults.helpers import (
    LiveServer,
    WorkerProcess,
    add_customer,
    dispose,
    make_live_app,
    signed_in_browser,
    wait_for,
)
from tests.support.api_client import make_key
from tests.support.fake_push_service import Answer, FakePushService
from tests.support.webhook_receiver import WebhookReceiver

KEYS = generate_vapid_keys()
SUBJECT = "mailto:faults@carnet.example"


@pytest.fixture
def receiver():
    running = WebhookReceiver().start()
    yield running
    running.stop()


@pytest.fixture
def push_service():
    with FakePushService() as running:
        yield running


def rows(app, model, *where):
    session = new_session(app)
    with session.begin():
        found = list(session.scalars(select(model).where(*where).order_by(model.id)))
    session.close()
    return found


def subscribe_browser(app, service, topic="offers") -> str:
    raw = service.new_subscription(application_server_key=KEYS.public_key)
    session = new_session(app)
    with session.begin():
        sub, _ = push.save_subscription(
            session, push.check_subscription(raw, allow_http=True, allow_private=True),
            customer=None,
            device_hash=push.sha256(raw["endpoint"]), user_agent="test", locale="en")
        push.set_topics(session, get_catalog(session), sub, None, [topic],
                        push.Proof("web_push", "test"))
    session.close()
    return raw["endpoint"]


def enroll(app, customer) -> None:
    program = load_program(CATALOG)
    assert program is not None
    session = new_session(app)
    with session.begin():
        loyalty.enroll(session, program, session.merge(customer), program.terms.version,
                       Proof("portal", "test"))
    session.close()


def test_portal_and_api_answer_while_the_worker_hangs_on_outside_services(
        db_url, tmp_path, receiver, push_service):
    # The receivers listen on 127.0.0.1.
    app = make_live_app(db_url, tmp_path, VAPID_PRIVATE_KEY=KEYS.private_pem,
                        VAPID_SUBJECT=SUBJECT, WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)
    key = make_key(app)
    auth = {"Authorization": f"Bearer {key}"}
    customer = add_customer(app, "slow@example.com")
    enroll(app, customer)
    stalled_endpoint = subscribe_browser(app, push_service)
    push_service.script(stalled_endpoint, Answer(stall=True), Answer())
    hook_worker = WorkerProcess(db_url, tmp_path / "worker.log", WEBHOOK_POLL_SECONDS=0.1,
                                WEBHOOK_TIMEOUT_SECONDS=60, PUSH_POLL_SECONDS=0.1,
                                PUSH_TIMEOUT_SECONDS=60, VAPID_PRIVATE_KEY=KEYS.private_pem,
                                VAPID_SUBJECT=SUBJECT, WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)
    try:
        with LiveServer(app) as server:
            browser = signed_in_browser(server, customer)
            api = requests.Session()
            api.headers.update(auth)

            def portal_and_api_answer() -> None:
                page = browser.get(server.url + "/loyalty", timeout=10)
                assert page.status_code == 200 and "Carnet Rewards" in page.text
                assert browser.get(server.url + "/preferences", timeout=10).status_code == 200
                decision = api.post(server.url + "/api/v1/decisions", timeout=10, json={
                    "customer": {"id": customer.public_id}, "topic": "offers",
                    "channel": "email"})
                assert decision.status_code == 200 and decision.json()["decision"] == "deny"
                # A write, too: the worker holds no transaction across its network calls.
                write = api.post(
                    f"{server.url}/api/v1/customers/{customer.public_id}/consents",
                    timeout=10, json={"topic": "events", "channel": "email",
                                      "state": "withdrawn", "source": "api", "actor": "t"})
                assert write.status_code == 201, write.text[:300]

            hook = api.post(server.url + "/api/v1/webhooks", timeout=10, json={
                "url": receiver.url, "events": ["customer.*"]}).json()
            receiver.secret = hook["secret"]
            receiver.stall_next(1)
            hook_worker.start()
            api.post(server.url + "/api/v1/customers", timeout=10,
                     json={"email": "new@example.com"})
            wait_for(receiver.stalled.is_set, what="the receiver to hang")
            portal_and_api_answer()
            assert rows(app, WebhookDelivery) == []  # the stall was still going on
            receiver.release()
            wait_for(lambda: rows(app, WebhookDelivery), what="the delivery to be recorded")

            sent = api.post(server.url + "/api/v1/push/messages", timeout=10, json={
                "topic": "offers", "audience": "all", "title": "Sale", "body": "Now",
                "ttl": 600})
            assert sent.status_code == 202
            wait_for(push_service.stalled.is_set, what="the push service to hang")
            portal_and_api_answer()
            assert [d.status for d in rows(app, PushDelivery)] == ["queued"]
            push_service.release_stalled()
            wait_for(lambda: [d.status for d in rows(app, PushDelivery)] == ["sent"],
                     what="the push to be recorded as sent")
    finally:
        hook_worker.stop()
        dispose(app)


def test_hanging_webhook_receiver_is_retried_with_backoff(db_url, tmp_path, receiver):
    base = 1.0
    app = make_live_app(db_url, tmp_path, WEBHOOK_TIMEOUT_SECONDS=0.3,
                        WEBHOOK_RETRY_BASE_SECONDS=base, WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)
    try:
        client, key = app.test_client(), make_key(app)
        auth = {"Authorization": f"Bearer {key}"}
        hook = client.post("/api/v1/webhooks", headers=auth,
                           json={"url": receiver.url, "events": ["*"]}).get_json()
        receiver.secret = hook["secret"]
        receiver.stall_next(2)
        assert client.post("/api/v1/customers", headers=auth,
                           json={"email": "later@example.com"}).status_code == 201

        def deliver() -> int:
            return int(worker.run_once(app, ["webhooks.deliver"])["webhooks.deliver"])

        def attempts_logged(n: int):
            def made() -> bool:
                deliver()
                return len(rows(app, WebhookDelivery)) >= n
            return made

        # On PostgreSQL the feed may hold the change back for a moment (see feed.read).
        wait_for(attempts_logged(1), timeout=10, what="the first attempt")
        (first,) = rows(app, WebhookDelivery)
        assert not first.ok and first.outcome == "timeout" and first.status_code is None
        assert first.next_attempt_at >= first.attempted_at + timedelta(seconds=base / 2)
        attempts = receiver.attempts
        assert deliver() == 0 and receiver.attempts == attempts  # not before its time
        wait_for(attempts_logged(2), timeout=10, what="the second attempt")
        second = rows(app, WebhookDelivery)[1]
        assert not second.ok and second.attempt == 2
        # Exponential: the second wait is at least the first's ceiling.
        assert second.next_attempt_at >= second.attempted_at + timedelta(seconds=base)
        (state,) = rows(app, Webhook)
        assert state.failures == 2 and state.disabled_at is None
        wait_for(lambda: deliver() == 1, timeout=15, what="the delivery after the backoff")
        log = rows(app, WebhookDelivery)
        assert [(d.ok, d.attempt) for d in log] == [(False, 1), (False, 2), (True, 1)]
        assert [e["type"] for e in receiver.received][-1] == "customer.created"
    finally:
        dispose(app)


def test_failing_and_hanging_push_services_are_retried_with_backoff(db_url, tmp_path,
                                                                     push_service):
    app = make_live_app(db_url, tmp_path, VAPID_PRIVATE_KEY=KEYS.private_pem,
                        VAPID_SUBJECT=SUBJECT, PUSH_TIMEOUT_SECONDS=0.5,
                        PUSH_RETRY_BASE_SECONDS=60, WEBHOOK_ALLOW_PRIVATE_NETWORKS=True)
    try:
        failing = subscribe_browser(app, push_service)
        hanging = subscribe_browser(app, push_service)
        subscribe_browser(app, push_service)  # one that answers at once
        push_service.script(failing, Answer(503), Answer())
        push_service.script(hanging, Answer(stall=True), Answer())
        client, key = app.test_client(), make_key(app)
        r = client.post("/api/v1/push/messages", headers={"Authorization": f"Bearer {key}"},
                        json={"topic": "offers", "audience": "all", "title": "T",
                              "body": "B", "ttl": 3600})
        assert r.status_code == 202
        now = utcnow()
        push_worker.fan_out(app, now)
        assert push_worker.deliver(app, now=now) == {"queued": 2, "sent": 1}
        by_endpoint = {d.subscription_id: d for d in rows(app, PushDelivery)}
        retried = [d for d in by_endpoint.values() if d.status == "queued"]
        assert len(retried) == 2
        for d in retried:
            assert d.attempts == 1 and d.reason == "retry" and d.error
            assert d.next_attempt_at >= now + timedelta(seconds=30)  # base 60, halved jitter
        assert {d.http_status for d in retried} == {503, None}  # None: timed out, no answer
        assert push_worker.deliver(app, now=now + timedelta(seconds=1)) == {}  # not yet
        later = max(d.next_attempt_at for d in retried) + timedelta(seconds=1)
        assert push_worker.deliver(app, now=later) == {"sent": 2}
        assert sorted(d.status for d in rows(app, PushDelivery)) == ["sent"] * 3
    finally:
        push_service.release_stalled()
        dispose(app)
