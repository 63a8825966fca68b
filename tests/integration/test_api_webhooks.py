"""The change feed and webhooks, delivered by the worker to a real local HTTP server."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest

from portal import create_app
from portal.core.db import new_session, utcnow
from portal.models.api import Webhook
from portal.outbox import feed, worker
from portal.services.webhooks import OUTCOMES, Policy, sign, verify
from tests.conftest import app_config
from tests.support.api_client import Api, field_errors
from tests.support.webhook_receiver import WebhookReceiver


def webhook_app(connection, tmp_path, allow_private):
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                 WEBHOOK_RETRY_BASE_SECONDS=0, WEBHOOK_MAX_ATTEMPTS=4,
                                 WEBHOOK_TIMEOUT_SECONDS=2,
                                 WEBHOOK_ALLOW_PRIVATE_NETWORKS=allow_private))


@pytest.fixture
def app(connection, tmp_path):
    """The local receiver listens on 127.0.0.1: these tests allow private networks."""
    return webhook_app(connection, tmp_path, True)


@pytest.fixture
def strict_api(connection, tmp_path, client):
    """The production setting: private and local destinations are refused."""
    strict = webhook_app(connection, tmp_path / "strict", False)
    return Api(strict, strict.test_client())


@pytest.fixture
def api(app, client):
    return Api(app, client)


@pytest.fixture
def receiver():
    r = WebhookReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def second_receiver():
    r = WebhookReceiver().start()
    yield r
    r.stop()


def deliver(app):
    return worker.run_once(app, ["webhooks.deliver"])["webhooks.deliver"]


def subscribe(api, receiver, events=("*",)):
    r = api.post("/webhooks", {"url": receiver.url, "events": list(events)})
    assert r.status_code == 201, r.get_json()
    hook = r.get_json()
    receiver.secret = hook["secret"]
    assert hook["secret"].startswith("whsec_")
    return hook


def grant(api, customer_id, topic="offers", channel="email"):
    r = api.post(f"/customers/{customer_id}/consents", {
        "topic": topic, "channel": channel, "state": "granted", "source": "api",
        "actor": "test"})
    assert r.status_code == 201


def test_events_feed_pages_with_a_cursor(api):
    start = api.get("/events").get_json()["next_cursor"]
    c = api.post("/customers", {"email": "feed@example.com"}).get_json()
    grant(api, c["id"])
    page = api.get(f"/events?after={start}&limit=1").get_json()
    assert [e["type"] for e in page["events"]] == ["customer.created"]
    assert page["events"][0]["customer"] == c["id"]
    page2 = api.get(f"/events?after={page['next_cursor']}").get_json()
    assert [e["type"] for e in page2["events"]] == ["consent.changed"]
    assert page2["events"][0]["data"]["topic"] == "offers"
    empty = api.get(f"/events?after={page2['next_cursor']}").get_json()
    assert empty["events"] == [] and empty["next_cursor"] == page2["next_cursor"]
    r = api.get("/events?after=garbage")
    assert r.status_code == 422 and field_errors(r) == {"after": "invalid_cursor"}
    assert field_errors(api.get("/events?limit=0")) == {"limit": "too_small"}
    assert field_errors(api.get("/events?limit=ten")) == {"limit": "type"}


def test_deliveries_are_signed_and_in_order(api, receiver):
    hook = subscribe(api, receiver)
    ids = [api.post("/customers", {"email": f"w{i}@example.com"}).get_json()["id"]
           for i in range(3)]
    grant(api, ids[0])
    assert deliver(api.app) == 4
    assert [e["type"] for e in receiver.received] == ["customer.created"] * 3 + [
        "consent.changed"]
    assert [e["customer"] for e in receiver.received[:3]] == ids
    assert receiver.rejected == []
    assert deliver(api.app) == 0  # nothing twice
    log = api.get(f"/webhooks/{hook['id']}/deliveries").get_json()["items"]
    assert len(log) == 4 and all(d["ok"] and d["status_code"] == 204 for d in log)
    listed = api.get("/webhooks").get_json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]


def test_receiver_down_then_up_gets_everything_later_in_order(api, receiver):
    hook = subscribe(api, receiver)
    receiver.stop()
    ids = [api.post("/customers", {"email": f"d{i}@example.com"}).get_json()["id"]
           for i in range(3)]
    assert deliver(api.app) == 0
    state = api.get(f"/webhooks/{hook['id']}").get_json()
    assert state["status"] == "failing" and state["failures"] == 1
    log = api.get(f"/webhooks/{hook['id']}/deliveries").get_json()["items"]
    assert log[0]["ok"] is False and log[0]["outcome"] == "connection_failed"
    assert log[0]["status_code"] is None
    # A fixed sentence: never the network error's text (addresses, ports, errno).
    assert log[0]["error"] == OUTCOMES["connection_failed"]
    receiver.start()  # same port
    assert deliver(api.app) == 3
    assert [e["customer"] for e in receiver.received] == ids
    assert api.get(f"/webhooks/{hook['id']}").get_json()["status"] == "active"


def test_failures_retry_then_disable_and_enable_resumes(api, receiver):
    hook = subscribe(api, receiver)
    api.post("/customers", {"email": "r@example.com"})
    receiver.fail_next(2, 503)
    assert deliver(api.app) == 0
    assert deliver(api.app) == 0
    assert deliver(api.app) == 1
    assert receiver.attempts == 3 and len(receiver.received) == 1
    attempts = [d["attempt"] for d in api.get(
        f"/webhooks/{hook['id']}/deliveries").get_json()["items"]]
    assert attempts == [1, 2, 1]  # newest first: two failures then the success

    api.post("/customers", {"email": "r2@example.com"})
    receiver.fail_next(10, 302)  # redirects are failures: never followed
    for _ in range(4):
        deliver(api.app)
    state = api.get(f"/webhooks/{hook['id']}").get_json()
    assert state["status"] == "disabled" and state["disabled_reason"]
    assert deliver(api.app) == 0
    receiver.failures.clear()
    assert api.post(f"/webhooks/{hook['id']}/enable").status_code == 200
    assert deliver(api.app) == 1
    assert [e["data"]["customer"] for e in receiver.received][-1] == \
        receiver.received[-1]["customer"]
    assert len(receiver.received) == 2


def test_event_type_filter_and_delete(api, receiver):
    hook = subscribe(api, receiver, events=["consent.*"])
    c = api.post("/customers", {"email": "f@example.com"}).get_json()
    grant(api, c["id"])
    api.post("/customers", {"email": "f2@example.com"})
    assert deliver(api.app) == 1
    assert [e["type"] for e in receiver.received] == ["consent.changed"]
    assert api.delete(f"/webhooks/{hook['id']}").status_code == 204
    assert api.get(f"/webhooks/{hook['id']}").status_code == 404
    grant(api, c["id"], "offers", "sms")
    assert deliver(api.app) == 0


def test_webhook_input_errors(api):
    r = api.post("/webhooks", {"url": "ftp://x.example.com", "events": ["*"]})
    assert field_errors(r) == {"url": "pattern"}
    r = api.post("/webhooks", {"url": "https://x.example.com", "events": ["Bad Type"]})
    assert field_errors(r) == {"events[0]": "pattern"}
    r = api.post("/webhooks", {"url": "https://x.example.com", "events": []})
    assert field_errors(r) == {"events": "too_few"}
    assert api.get("/webhooks/whk_nope/deliveries").status_code == 404
    assert api.delete("/webhooks/whk_nope").status_code == 404
    assert api.post("/webhooks/whk_nope/enable").status_code == 404


def test_signature_scheme_and_backoff_policy():
    body = b'{"id":"0_1"}'
    header = sign("whsec_x", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify("whsec_x", body, header, now=1_700_000_010)
    assert not verify("whsec_y", body, header, now=1_700_000_010)
    assert not verify("whsec_x", body + b" ", header, now=1_700_000_010)
    assert not verify("whsec_x", body, header, now=1_700_001_000)  # replayed too late
    policy = Policy(base_seconds=10)
    for failures, ceiling in ((1, 10), (2, 20), (5, 160), (30, 6 * 3600)):
        delays = [policy.delay(failures) for _ in range(50)]
        assert all(timedelta(seconds=ceiling / 2) <= d <= timedelta(seconds=ceiling)
                   for d in delays)
        assert len(set(delays)) > 1  # jitter


PRIVATE_URLS = [
    "http://127.0.0.1:5432/", "http://localhost/", "http://[::1]/", "http://2130706433/",
    "http://0x7f.1/", "http://127.1/", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.8/hook", "http://192.168.1.1/", "http://172.16.0.1/", "http://[fd00::1]/",
    "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://db.internal/",
    "http://printer.local/", "http://intranet/",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_destinations_are_refused_at_registration(strict_api, url):
    r = strict_api.post("/webhooks", {"url": url, "events": ["*"]})
    assert r.status_code == 422, r.get_json()
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert field_errors(r) in ({"url": "private_address"}, {"url": "reserved_name"})
    assert strict_api.get("/webhooks").get_json()["items"] == []


@pytest.mark.parametrize("url, code", [
    ("https://\u00a6\u00efQ\u00ea;/", "invalid_url"),
    ("https://user:secret@hooks.example.com/", "userinfo"),
    ("https://hooks.example.com:22/", "port"),
    ("https://-bad-.example.com/", "invalid_url"),
])
def test_malformed_urls_are_refused_at_registration(api, url, code):
    r = api.post("/webhooks", {"url": url, "events": ["*"]})
    assert r.status_code == 422 and field_errors(r) == {"url": code}


def test_registration_stores_the_normalised_url(strict_api):
    r = strict_api.post("/webhooks", {"url": "https://B\u00fccher.Example.com/h?x=1#frag",
                                      "events": ["*"]})
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["url"] == "https://xn--bcher-kva.example.com/h?x=1"


def insert_hook(app, url, events=("*",)):
    """An endpoint written straight into the table, as older versions accepted it."""
    session = new_session(app)
    with session.begin():
        head = feed.head(session)
        hook = Webhook(public_id="whk_" + secrets.token_urlsafe(8), url=url,
                       event_types=list(events), secret="whsec_test", failures=0,
                       cursor_txid=head.txid, cursor_id=head.id, created_at=utcnow())
        session.add(hook)
    session.close()
    return hook.public_id


def test_a_private_url_stored_earlier_is_refused_at_delivery(api, receiver):
    hook = subscribe(api, receiver)  # accepted while private networks were allowed
    by_name = insert_hook(api.app, receiver.url.replace("127.0.0.1", "localhost"))
    api.post("/customers", {"email": "ssrf@example.com"})
    api.app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = False
    assert deliver(api.app) == 0
    assert receiver.attempts == 0  # no connection reached the local receiver
    for public_id in (hook["id"], by_name):
        state = api.get(f"/webhooks/{public_id}").get_json()
        assert state["status"] == "failing" and state["failures"] == 1
        (entry,) = api.get(f"/webhooks/{public_id}/deliveries").get_json()["items"]
        assert entry["outcome"] == "refused_destination" and entry["ok"] is False
        assert entry["status_code"] is None
        assert entry["error"] == OUTCOMES["refused_destination"]
    api.app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = True
    assert deliver(api.app) == 1  # once allowed again (the other one has a wrong secret)
    assert len(receiver.received) == 1


def test_a_poisoned_endpoint_fails_alone_and_is_disabled(api, receiver, second_receiver):
    first = subscribe(api, receiver)
    poisoned = insert_hook(api.app, "https://\u00a6\u00efQ\u00ea;/")
    second = subscribe(api, second_receiver)
    api.post("/customers", {"email": "poison@example.com"})
    assert deliver(api.app) == 2  # both good endpoints, in the same run
    assert len(receiver.received) == len(second_receiver.received) == 1
    state = api.get(f"/webhooks/{poisoned}").get_json()
    assert state["status"] == "failing" and state["failures"] == 1
    (entry,) = api.get(f"/webhooks/{poisoned}/deliveries").get_json()["items"]
    assert entry["outcome"] == "invalid_url" and entry["error"] == OUTCOMES["invalid_url"]
    for _ in range(3):  # WEBHOOK_MAX_ATTEMPTS=4
        deliver(api.app)
    assert api.get(f"/webhooks/{poisoned}").get_json()["status"] == "disabled"
    for good in (first, second):
        assert api.get(f"/webhooks/{good['id']}").get_json()["status"] == "active"


def test_an_endpoint_whose_delivery_crashes_fails_alone(api, receiver, second_receiver):
    """Any exception while delivering to one endpoint counts against that endpoint only."""
    subscribe(api, receiver)
    broken = insert_hook(api.app, receiver.url, events=(None,))  # matching raises
    subscribe(api, second_receiver)
    api.post("/customers", {"email": "crash@example.com"})
    assert deliver(api.app) == 2
    state = api.get(f"/webhooks/{broken}").get_json()
    assert state["status"] == "failing" and state["failures"] == 1


def test_delivery_outcomes_are_declared_in_the_openapi_document(api):
    spec = api.get("/openapi.json").get_json()
    answer = spec["paths"]["/api/v1/webhooks/{webhook_id}/deliveries"]["get"]["responses"]["200"]
    schema = answer["content"]["application/json"]["schema"]
    item = schema["properties"]["items"]["items"]
    assert set(item["properties"]["outcome"]["enum"]) == set(OUTCOMES)
