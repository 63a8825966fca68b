"""Decisions through the HTTP API: every reason code, batch, dispatches, the weekly cap."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import event

from portal.core.db import get_engine
from portal.models.consent import ContactRule, Dispatch, Suppression
from portal.services.decisions import REASONS
from tests.support.api_client import Api, field_errors


@pytest.fixture
def api(app, client):
    return Api(app, client)


def decide(api, customer, topic, channel, **extra):
    ref = customer if isinstance(customer, dict) else {"id": customer.public_id}
    r = api.post("/decisions", {"customer": ref, "topic": topic, "channel": channel, **extra})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_every_reason_code_through_the_api(api):
    seen = {}
    c = api.customer("ann@example.com", phone="+33612345678")
    api.consent(c, "newsletter", "email", "granted")
    seen["consented"] = decide(api, c, "newsletter", "email")
    seen["required_service"] = decide(api, c, "account", "email")
    seen["not_consented"] = decide(api, c, "offers", "email")
    api.consent(c, "surveys", "email", "withdrawn")
    seen["withdrawn"] = decide(api, c, "surveys", "email")
    api.consent(c, "events", "email", "pending")
    seen["pending_confirmation"] = decide(api, c, "events", "email")
    api.consent(c, "*", "web_push", "withdrawn")
    seen["channel_off"] = decide(api, c, "newsletter", "web_push")
    paused = api.customer("paused@example.com")
    api.consent(paused, "newsletter", "email", "granted")
    api.consent(paused, "*", "*", "withdrawn")
    seen["marketing_paused"] = decide(api, paused, "newsletter", "email")
    bounced = api.customer("bounce@example.com")
    api.add(Suppression(customer_id=bounced.id, channel="email", reason="hard_bounce"))
    seen["suppressed"] = decide(api, bounced, "account", "email")
    nophone = api.customer("nophone@example.com")
    seen["no_contact_point"] = decide(api, nophone, "account", "sms")
    seen["channel_not_offered"] = decide(api, c, "newsletter", "sms")
    seen["unknown_topic"] = decide(api, c, "nope", "email")
    seen["unknown_customer"] = decide(api, {"email": "nobody@example.com"}, "account", "email")
    gone = api.customer("gone@example.com")
    _erase(api, gone)  # through the model: the privacy flow is tested with the portal
    seen["erased"] = decide(api, gone, "account", "email")
    quiet = api.customer("quiet@example.com")
    api.consent(quiet, "newsletter", "email", "granted")
    api.add(ContactRule(customer_id=quiet.id, channel="email", quiet_start=time(0, 0),
                        quiet_end=time(23, 59)))
    seen["quiet_hours"] = decide(api, quiet, "newsletter", "email")
    capped = api.customer("capped@example.com")
    api.consent(capped, "newsletter", "email", "granted")
    api.add(ContactRule(customer_id=capped.id, channel="email", max_per_week=1))
    r = api.post("/dispatches", {"customer": {"email": "capped@example.com"},
                                 "topic": "newsletter", "channel": "email",
                                 "sender": "mailer"})
    assert r.status_code == 201
    seen["frequency_cap"] = decide(api, capped, "newsletter", "email")

    assert set(seen) == set(REASONS)
    for reason, answer in seen.items():
        assert answer["reason"] == reason, (reason, answer)
    assert seen["consented"]["decision"] == "send" and seen["consented"]["allowed"] is True
    assert seen["consented"]["contact"] == {"email": "ann@example.com"}
    assert seen["consented"]["evidence"]["source"] == "portal"
    assert seen["consented"]["evidence"]["wording_version"] == 1
    assert seen["withdrawn"]["decision"] == "deny"
    for deferred in ("quiet_hours", "frequency_cap"):
        assert seen[deferred]["decision"] == "defer"
        assert seen[deferred]["allowed"] is False
        assert datetime.fromisoformat(seen[deferred]["next_allowed_at"]) > datetime.now(UTC)


def _erase(api, customer):
    from portal.core.db import new_session, utcnow
    from portal.models.customer import Customer

    session = new_session(api.app)
    with session.begin():
        session.get(Customer, customer.id).erased_at = utcnow()
    session.close()


def test_explain_gives_the_trace_and_at_moves_time(api):
    c = api.customer("t@example.com")
    api.consent(c, "newsletter", "email", "granted")
    api.add(ContactRule(customer_id=c.id, channel="email", quiet_start=time(22, 0),
                        quiet_end=time(7, 0)))
    night = "2026-03-10T23:30:00+01:00"
    answer = decide(api, c, "newsletter", "email", at=night, explain=True)
    assert answer["decision"] == "defer" and answer["reason"] == "quiet_hours"
    assert answer["next_allowed_at"].startswith("2026-03-11T06:00:00")  # 07:00 Paris
    rules = [step["rule"] for step in answer["trace"]]
    assert rules[0] == "customer" and rules[-1] == "quiet_hours"
    day = decide(api, c, "newsletter", "email", at="2026-03-10T12:00:00Z")
    assert day["decision"] == "send" and "trace" not in day


def test_weekly_cap_counts_reported_dispatches_and_frees_up(api):
    c = api.customer("cap@example.com")
    api.consent(c, "offers", "email", "granted")
    api.add(ContactRule(customer_id=c.id, channel="email", max_per_week=2))
    first = datetime(2026, 3, 2, 10, tzinfo=UTC)
    for offset in (0, 1):
        r = api.post("/dispatches", {"customer": {"id": c.public_id}, "topic": "offers",
                                     "channel": "email", "sender": "crm",
                                     "message_id": f"m{offset}",
                                     "sent_at": (first + timedelta(days=offset)).isoformat()})
        assert r.status_code == 201
    at = (first + timedelta(days=3)).isoformat()
    answer = decide(api, c, "offers", "email", at=at)
    assert answer["reason"] == "frequency_cap"
    assert answer["next_allowed_at"].startswith("2026-03-09T10:00:00")
    later = decide(api, c, "offers", "email", at="2026-03-09T10:00:01Z")
    assert later["decision"] == "send"


def test_identifier_kinds_and_merged_customers_resolve(api):
    c = api.customer("kinds@example.com", phone="+33698765432")
    r = api.put("/customers/external/crm/C-1", {"email": "kinds@example.com"})
    assert r.status_code == 200
    for ref in ({"email": "KINDS@example.com"}, {"phone": "+33 6 98 76 54 32"},
                {"external_id": {"namespace": "crm", "value": "C-1"}}, {"id": c.public_id}):
        assert decide(api, ref, "account", "email")["reason"] == "required_service"
    assert decide(api, {"member_number": "271800000001"}, "account",
                  "email")["reason"] == "unknown_customer"
    other = api.customer("other@example.com")
    r = api.post("/customers/merge", {"survivor": {"id": c.public_id},
                                      "merged": {"id": other.public_id}})
    assert r.status_code == 200
    answer = decide(api, {"id": other.public_id}, "account", "email")
    assert answer["contact"] == {"email": "kinds@example.com"}


def test_member_number_hook_resolves_once_filled(api, monkeypatch):
    from portal.services import identity

    c = api.customer("member@example.com")
    monkeypatch.setattr(identity.member_numbers, "find",
                        lambda session, numbers: {n: c.id for n in numbers if n == "2718-1"})
    assert decide(api, {"member_number": "2718-1"}, "account",
                  "email")["reason"] == "required_service"


def count_queries(app):
    counter = {"n": 0}
    bind = get_engine(app)
    engine = bind.engine if hasattr(bind, "engine") else bind

    def on_execute(*_args):
        counter["n"] += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    return counter, lambda: event.remove(engine, "before_cursor_execute", on_execute)


def _batch_items(customers, n):
    kinds = ["id", "email", "external_id", "phone"]
    items = []
    for i in range(n):
        c = customers[i % len(customers)]
        kind = kinds[i % len(kinds)]
        ref = ({"id": c.public_id} if kind == "id" else {"email": c.email} if kind == "email"
               else {"external_id": {"namespace": "shop", "value": c.email}}
               if kind == "external_id" else {"phone": c.phone})
        items.append({"customer": ref, "topic": ["newsletter", "offers", "account"][i % 3],
                      "channel": "email"})
    return items


def test_batch_answers_in_order_with_a_constant_number_of_queries(api):
    customers = []
    for i in range(40):
        r = api.post("/customers", {"email": f"b{i}@example.com", "phone": f"+3361200{i:04d}",
                                    "external_ids": [{"namespace": "shop",
                                                      "value": f"b{i}@example.com"}]})
        assert r.status_code == 201, r.get_json()
        customers.append(r.get_json())
    from types import SimpleNamespace

    customers = [SimpleNamespace(public_id=c["id"], email=c["email"], phone=c["phone"])
                 for c in customers]
    api.consent(SimpleNamespace(id=_internal(api, customers[0].public_id)), "newsletter",
                "email", "granted")
    counts = {}
    api.post("/decisions/batch", {"items": _batch_items(customers, 1)})  # catalog cached
    for n in (10, 1000):
        items = _batch_items(customers, n)
        items.append({"customer": {"email": "ghost@example.com"}, "topic": "account",
                      "channel": "email"})
        counter, stop = count_queries(api.app)
        try:
            r = api.post("/decisions/batch", {"items": items})
        finally:
            stop()
        assert r.status_code == 200
        results = r.get_json()["results"]
        assert len(results) == n + 1
        assert results[0]["reason"] == "consented"  # customer 0, newsletter, by id
        assert results[1]["reason"] == "not_consented"  # customer 1, offers
        assert results[2]["reason"] == "required_service"
        assert results[-1]["reason"] == "unknown_customer"
        counts[n] = counter["n"]
    assert counts[10] == counts[1000], counts
    assert counts[1000] <= 20


def _internal(api, public_id):
    from portal.core.db import new_session
    from portal.services.identity import by_public_id

    session = new_session(api.app)
    with session.begin():
        cid = by_public_id(session, public_id).id
    session.close()
    return cid


def test_batch_limits_and_errors_name_the_item(api):
    r = api.post("/decisions/batch", {"items": []})
    assert r.status_code == 422 and field_errors(r) == {"items": "too_few"}
    r = api.post("/decisions/batch", {"items": [{"customer": {"email": "a@b.c"},
                                                 "topic": "x", "channel": "fax"}]})
    assert field_errors(r) == {"items[0].channel": "enum"}
    big = [{"customer": {"id": "x"}, "topic": "t", "channel": "email"}] * 10_001
    r = api.post("/decisions/batch", {"items": big})
    assert r.status_code == 422 and field_errors(r) == {"items": "too_many"}


def test_dispatch_for_unknown_customer_is_refused(api):
    r = api.post("/dispatches", {"customer": {"email": "nobody@example.com"},
                                 "topic": "offers", "channel": "email", "sender": "crm"})
    assert r.status_code == 422 and field_errors(r) == {"customer": "unknown_customer"}
    assert r.mimetype == "application/problem+json"


def test_dispatches_are_stored(api):
    c = api.customer("d@example.com")
    r = api.post("/dispatches", {"customer": {"id": c.public_id}, "topic": "offers",
                                 "channel": "sms", "sender": "sms-gw", "message_id": None})
    assert r.status_code == 201
    from portal.core.db import new_session

    session = new_session(api.app)
    assert session.get(Dispatch, r.get_json()["id"]).sender == "sms-gw"
    session.close()


def test_decisions_report_their_server_time_and_stay_within_few_statements(api):
    c = api.customer("timed@example.com")
    api.consent(c, "newsletter", "email", "granted")
    decide(api, c, "newsletter", "email")  # catalog cached, key use recorded
    bind = get_engine(api.app)
    engine = bind.engine if hasattr(bind, "engine") else bind
    selects = []

    def on_execute(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            selects.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        r = api.post("/decisions", {"customer": {"email": "Timed@Example.com"},
                                    "topic": "newsletter", "channel": "email"})
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert r.status_code == 200 and r.get_json()["reason"] == "consented"
    # the caller's key, the person and their facts (states, suppressions and contact rules)
    # in one UNION: one round trip
    assert len(selects) == 1, selects
    r = api.post("/decisions/batch", {"items": [
        {"customer": {"id": c.public_id}, "topic": "newsletter", "channel": "email"}]})
    timing = r.headers["Server-Timing"]
    assert {part.split(";")[0] for part in timing.split(", ")} >= {
        "auth", "parse", "decide", "encode", "app"}
    assert float(timing.rsplit("app;dur=", 1)[1]) > 0
