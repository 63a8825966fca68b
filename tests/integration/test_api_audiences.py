"""Audiences: paginated JSON and streamed NDJSON, decided by the precedence module."""

from __future__ import annotations

import json

import pytest

from portal.models.consent import Suppression
from portal.services import audiences
from tests.support.api_client import Api, field_errors


@pytest.fixture
def api(app, client):
    return Api(app, client)


@pytest.fixture
def base(api):
    """12 customers: even ones granted newsletter by email; #4 suppressed; #6 paused."""
    made = []
    for i in range(12):
        c = api.customer(f"aud{i:02d}@example.com")
        if i % 2 == 0:
            api.consent(c, "newsletter", "email", "granted")
        made.append(c)
    api.add(Suppression(customer_id=made[4].id, channel="email", reason="complaint"))
    api.consent(made[6], "*", "*", "withdrawn")
    return made


def expected(base):
    return [c.public_id for i, c in enumerate(base) if i % 2 == 0 and i not in (4, 6)]


def test_json_pages_follow_the_cursor(api, base):
    got, cursor = [], None
    for _ in range(10):
        r = api.get("/audiences/newsletter/email?limit=2" + (f"&cursor={cursor}" if cursor
                                                             else ""))
        assert r.status_code == 200
        page = r.get_json()
        assert len(page["items"]) <= 2
        got += [item["customer"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == expected(base)
    first = api.get("/audiences/newsletter/email").get_json()["items"][0]
    assert first["contact"] == {"email": "aud00@example.com"} and first["reason"] == "consented"


def test_ndjson_streams_every_member(api, base, monkeypatch):
    monkeypatch.setattr(audiences, "CHUNK", 3)  # several chunks even for a small base
    r = api.get("/audiences/newsletter/email",
                headers={"Accept": "application/x-ndjson"}, buffered=False)
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    assert r.is_streamed
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    # NDJSON promises no order (PostgreSQL's COPY reads in physical order): every member once.
    assert sorted(line["customer"] for line in lines) == sorted(expected(base))


def test_service_topic_with_default_includes_everyone_reachable(api, base):
    items = api.get("/audiences/orders/email?limit=100").get_json()["items"]
    assert len(items) == 11  # all but the suppressed one (orders is a service topic)


def test_audience_errors(api):
    r = api.get("/audiences/nope/email")
    assert r.status_code == 404 and field_errors(r) == {"topic": "not_found"}
    r = api.get("/audiences/newsletter/sms")
    assert r.status_code == 422 and field_errors(r) == {"channel": "channel_not_offered"}
    r = api.get("/audiences/newsletter/email?cursor=cus_unknown")
    assert field_errors(r) == {"cursor": "invalid_cursor"}
    r = api.get("/audiences/newsletter/email?limit=0")
    assert field_errors(r) == {"limit": "too_small"}
