"""The loyalty endpoints of the API: enrollment, members, earn/redeem/adjust with
Idempotency-Key (replays, reused keys, concurrent retries), reversals, scopes, bad input, the
change feed and webhooks, and member numbers as customer identifiers."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from portal import create_app
from portal.core.db import make_engine, utcnow
from portal.loyalty import ledger
from portal.loyalty.models import IdempotencyRecord, LedgerEntry, Member
from portal.loyalty.program import load_program, luhn_check_digit
from portal.outbox import worker
from tests.conftest import CATALOG, app_config, prepare_schema
from tests.support.api_client import Api, field_errors, make_key
from tests.support.databases import PG_URL, fresh_database
from tests.support.statements import counting
from tests.support.webhook_receiver import WebhookReceiver

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
TERMS = PROGRAM.terms.version
PROBLEMS = "https://carnet.dev/problems/"


@pytest.fixture
def api(app, client):
    return Api(app, client)


def enroll(api, email="ann@example.com"):
    customer = api.customer(email)
    r = api.post("/loyalty/members", {"customer": customer.public_id, "terms_version": TERMS})
    assert r.status_code == 201, r.get_json()
    return customer, r.get_json()


def post(api, number, body, idempotency_key, **kw):
    headers = {"Idempotency-Key": idempotency_key}
    return api.post(f"/loyalty/members/{number}/transactions", body, headers=headers, **kw)


def earn(api, number, points, ref, key=None):
    r = post(api, number, {"type": "earn", "points": points, "reason": f"Order {ref}",
                           "source_ref": ref, "store": "Paris 11"}, key or f"earn-{ref}")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def entries(session, number):
    member = session.scalars(select(Member).where(Member.member_number == number)).one()
    return session.scalars(select(LedgerEntry).where(LedgerEntry.member_id == member.id)
                           .order_by(LedgerEntry.id)).all()


def problem_type(response):
    return response.get_json()["type"].removeprefix(PROBLEMS)


def other_number(number):
    """A well-formed (Luhn-valid) number nobody holds."""
    body = number[:-2] + str((int(number[-2]) + 1) % 10)
    return body + luhn_check_digit(body)


# --- enrollment and reading --------------------------------------------------------------------


def test_enroll_then_read_the_member(api):
    customer, member = enroll(api)
    number = member["member_number"]
    assert PROGRAM.number.matches(number)
    assert member["customer"] == customer.public_id
    assert member["balance"] == 0 and member["tier"] == "bronze"
    assert member["next_tier"] == "silver" and member["points_to_next_tier"] == 1000
    assert member["terms_version"] == TERMS and member["left_at"] is None
    read = api.get(f"/loyalty/members/{number}")
    assert read.status_code == 200 and read.get_json() == member
    reader = make_key(api.app, "decisions:read", name="reader")
    assert api.get(f"/loyalty/members/{number}", key=reader).status_code == 200


def test_enroll_refusals(api):
    customer, member = enroll(api)
    again = api.post("/loyalty/members", {"customer": customer.public_id,
                                          "terms_version": TERMS})
    assert again.status_code == 409 and problem_type(again) == "already-member"
    assert field_errors(again) == {"customer": "already_member"}
    unknown = api.post("/loyalty/members", {"customer": "cus_nobody", "terms_version": TERMS})
    assert unknown.status_code == 404 and field_errors(unknown) == {"customer": "not_found"}
    other = api.customer("bob@example.com")
    for version in (TERMS + 1, 999):
        r = api.post("/loyalty/members", {"customer": other.public_id, "terms_version": version})
        assert r.status_code == 422 and field_errors(r) == {"terms_version": "terms_not_accepted"}
    for body, errors in [
        ({"customer": other.public_id}, {"terms_version": "required"}),
        ({"customer": other.public_id, "terms_version": "1"}, {"terms_version": "type"}),
        ({"customer": other.public_id, "terms_version": TERMS, "vip": True},
         {"vip": "unknown_field"}),
        ({"customer": "", "terms_version": 0}, {"customer": "required",
                                                 "terms_version": "too_small"}),
        ([], {"body": "type"}),
    ]:
        r = api.post("/loyalty/members", body)
        assert r.status_code == 422 and field_errors(r) == errors, (body, r.get_json())
    malformed = api.post("/loyalty/members", data="{nope", content_type="application/json")
    assert malformed.status_code == 400 and problem_type(malformed) == "malformed-json"
    form = api.post("/loyalty/members", data="customer=x", content_type="text/plain")
    assert form.status_code == 415


def test_unknown_or_malformed_member_numbers_are_not_found(api):
    _, member = enroll(api)
    for number in (other_number(member["member_number"]),     # Luhn-valid, nobody's
                   member["member_number"][:-1] + str((int(member["member_number"][-1]) + 1)
                                                      % 10),  # bad check digit
                   "abc", "1" * 200):
        r = api.get(f"/loyalty/members/{number}")
        assert r.status_code == 404 and field_errors(r) == {"member_number": "not_found"}
        r = post(api, number, {"type": "adjust", "points": 5, "reason": "x"}, "k-404")
        assert r.status_code == 404


def test_member_numbers_identify_customers_in_lookup_and_decisions(api):
    customer, member = enroll(api)
    number = member["member_number"]
    found = api.get(f"/customers/lookup?member_number={number}")
    assert found.status_code == 200
    assert found.get_json()["id"] == customer.public_id
    assert found.get_json()["member_number"] == number
    assert api.get(f"/customers/{customer.public_id}").get_json()["member_number"] == number
    spaced = " ".join(number[i:i + 4] for i in range(0, len(number), 4))
    assert api.get("/customers/lookup", query_string={"member_number": spaced}
                   ).get_json()["id"] == customer.public_id
    decision = api.post("/decisions", {"customer": {"member_number": number},
                                       "topic": "account", "channel": "email"}).get_json()
    assert decision["reason"] == "required_service"
    nobody = api.get(f"/customers/lookup?member_number={other_number(number)}")
    assert nobody.status_code == 404


def test_a_member_who_left_is_no_longer_found_by_number(api, session):
    customer, member = enroll(api)
    row = session.scalars(select(Member).where(Member.customer_id == customer.id)).one()
    ledger.leave(session, PROGRAM, row, actor="test")
    session.flush()
    number = member["member_number"]
    assert api.get(f"/customers/lookup?member_number={number}").status_code == 404
    assert api.get(f"/customers/{customer.public_id}").get_json()["member_number"] is None
    read = api.get(f"/loyalty/members/{number}").get_json()
    assert read["left_at"] is not None and read["next_tier"] is None
    r = post(api, number, {"type": "adjust", "points": 5, "reason": "gift"}, "after-leaving")
    assert r.status_code == 409 and problem_type(r) == "membership-ended"


# --- earn, redeem, adjust --------------------------------------------------------------------


def test_earn_redeem_adjust_move_balance_and_tier(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    first = earn(api, number, 600, "1001")
    assert first["balance"] == 600 and first["tier"] == "bronze"
    assert first["entry"]["type"] == "earn" and first["entry"]["points"] == 600
    assert first["entry"]["source_ref"] == "1001" and first["entry"]["store"] == "Paris 11"
    assert first["entry"]["expires_at"] is not None
    second = earn(api, number, 500, "1002")
    assert second["balance"] == 1100 and second["tier"] == "silver"
    spent = post(api, number, {"type": "redeem", "points": 300, "reason": "Tote bag"}, "r-1")
    assert spent.status_code == 201
    assert spent.get_json()["balance"] == 800 and spent.get_json()["entry"]["points"] == -300
    assert spent.get_json()["tier"] == "silver"  # tiers count points earned, not the balance
    for points, balance in ((-50, 750), (25, 775)):
        r = post(api, number, {"type": "adjust", "points": points, "reason": "Goodwill"},
                 f"adj{points}")
        assert r.status_code == 201 and r.get_json()["balance"] == balance
    read = api.get(f"/loyalty/members/{number}").get_json()
    assert read["balance"] == 775 and read["tier"] == "silver"
    assert read["next_tier"] == "gold" and read["points_to_next_tier"] == 5000 - 1100
    assert read["earned_in_window"] == 1100
    assert [e.kind for e in entries(session, number)] == ["earn", "earn", "redeem", "adjust",
                                                           "adjust"]
    row = session.scalars(select(Member).where(Member.member_number == number)).one()
    assert ledger.check_member(session, row) == []


def test_points_expiring_soon_are_listed_with_their_dates(api):
    _, member = enroll(api)
    number = member["member_number"]
    old = (utcnow() - timedelta(days=710)).isoformat()  # expires in about 20 days
    r = post(api, number, {"type": "earn", "points": 80, "reason": "Old order",
                           "source_ref": "OLD-1", "occurred_at": old}, "old-1")
    assert r.status_code == 201, r.get_json()
    earn(api, number, 40, "NEW-1")
    soon = api.get(f"/loyalty/members/{number}").get_json()["expiring_soon"]
    assert soon["points"] == 80 and soon["within_days"] == 30
    assert [lot["points"] for lot in soon["lots"]] == [80]
    assert soon["lots"][0]["expires_at"] == r.get_json()["entry"]["expires_at"]


def test_replay_returns_the_original_answer_once_written(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    body = {"type": "earn", "points": 120, "reason": "Order 42", "source_ref": "42"}
    first = post(api, number, body, "till-7-42")
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    # The same request again, even with keys in another order and other whitespace.
    raw = json.dumps(dict(reversed(list(body.items()))), indent=2)
    again = api.post(f"/loyalty/members/{number}/transactions", data=raw,
                     content_type="application/json",
                     headers={"Idempotency-Key": '"till-7-42"'})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert len(entries(session, number)) == 1
    # Later writes do not change what the key answers.
    earn(api, number, 10, "43")
    assert post(api, number, body, "till-7-42").get_json()["balance"] == 120


def test_a_key_reused_for_another_request_is_refused(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    post(api, number, {"type": "adjust", "points": 10, "reason": "gift"}, "k-1")
    changed = post(api, number, {"type": "adjust", "points": 11, "reason": "gift"}, "k-1")
    assert changed.status_code == 422 and problem_type(changed) == "idempotency-key-reused"
    assert field_errors(changed) == {"Idempotency-Key": "reused"}
    _, bob = enroll(api, "bob@example.com")
    elsewhere = post(api, bob["member_number"], {"type": "adjust", "points": 10,
                                                 "reason": "gift"}, "k-1")
    assert elsewhere.status_code == 422  # the path is part of the request
    assert len(entries(session, number)) == 1 and entries(session, bob["member_number"]) == []
    # Keys belong to the API key that sent them: another client's k-1 is its own.
    other = make_key(api.app, "loyalty:write", name="other-till")
    mine = post(api, number, {"type": "adjust", "points": 11, "reason": "gift"}, "k-1",
                key=other)
    assert mine.status_code == 201 and mine.get_json()["balance"] == 21


def test_an_order_earns_once_whatever_the_key(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    earn(api, number, 100, "A-1")
    dup = post(api, number, {"type": "earn", "points": 100, "reason": "Order A-1",
                             "source_ref": "A-1"}, "another-key")
    assert dup.status_code == 409 and problem_type(dup) == "duplicate-source-ref"
    assert field_errors(dup) == {"source_ref": "duplicate_source_ref"}
    replayed = post(api, number, {"type": "earn", "points": 100, "reason": "Order A-1",
                                  "source_ref": "A-1"}, "another-key")
    assert replayed.status_code == 409 and replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.get_json() == dup.get_json()
    assert replayed.mimetype == "application/problem+json"
    assert len(entries(session, number)) == 1


def test_redeeming_more_than_the_balance_writes_nothing(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    earn(api, number, 100, "B-1")
    before = session.scalar(select(func.count()).select_from(LedgerEntry))
    r = post(api, number, {"type": "redeem", "points": 101, "reason": "Too much"}, "over-1")
    assert r.status_code == 422 and field_errors(r) == {"points": "insufficient_points"}
    assert "balance is 100" in r.get_json()["detail"]
    assert session.scalar(select(func.count()).select_from(LedgerEntry)) == before
    assert api.get(f"/loyalty/members/{number}").get_json()["balance"] == 100
    row = session.scalars(select(Member).where(Member.member_number == number)).one()
    assert ledger.check_member(session, row) == []


def test_idempotency_key_header_is_required_and_bounded(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    body = {"type": "adjust", "points": 5, "reason": "gift"}
    for headers in ({}, {"Idempotency-Key": ""}, {"Idempotency-Key": '""'}):
        r = api.post(f"/loyalty/members/{number}/transactions", body, headers=headers)
        assert r.status_code == 400 and problem_type(r) == "idempotency-key-missing"
        assert field_errors(r) == {"Idempotency-Key": "required"}
    long = post(api, number, body, "k" * 256)
    assert long.status_code == 400 and problem_type(long) == "idempotency-key-invalid"
    assert post(api, number, body, "k" * 255).status_code == 201
    assert len(entries(session, number)) == 1


def test_transaction_input_is_validated_before_the_key_is_kept(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    future = (utcnow() + timedelta(hours=1)).isoformat()
    cases = [
        ({"type": "earn", "points": 10, "reason": "x"}, {"source_ref": "required"}),
        ({"type": "adjust", "points": 0, "reason": "x"}, {"points": "zero"}),
        ({"type": "earn", "points": -5, "reason": "x", "source_ref": "r"},
         {"points": "too_small"}),
        ({"type": "redeem", "points": -5, "reason": "x"}, {"points": "too_small"}),
        ({"type": "adjust", "points": 10_000_001, "reason": "x"}, {"points": "too_large"}),
        ({"type": "adjust", "points": 1.5, "reason": "x"}, {"points": "type"}),
        ({"type": "adjust", "points": True, "reason": "x"}, {"points": "type"}),
        ({"type": "gift", "points": 5, "reason": "x"}, {"type": "enum"}),
        ({"type": "adjust", "points": 5, "reason": "   "}, {"reason": "blank"}),
        ({"type": "adjust", "points": 5, "reason": "r" * 201}, {"reason": "too_long"}),
        ({"type": "adjust", "points": 5}, {"reason": "required"}),
        ({"type": "adjust", "points": 5, "reason": "x", "bonus": 1}, {"bonus": "unknown_field"}),
        ({"type": "adjust", "points": 5, "reason": "x", "occurred_at": future},
         {"occurred_at": "in_future"}),
        ({"type": "adjust", "points": 5, "reason": "x", "occurred_at": "2026-01-01T10:00:00"},
         {"occurred_at": "timezone_required"}),
        ({"type": "adjust", "points": 5, "reason": "x", "occurred_at": "0001-01-01T00:00:00+01:00"},
         {"occurred_at": "too_old"}),
        ({"type": "earn", "points": 5, "reason": "x", "source_ref": "r" * 121},
         {"source_ref": "too_long"}),
        ({"type": "adjust", "points": 5, "reason": "x", "store": "s" * 65}, {"store": "too_long"}),
    ]
    for body, errors in cases:
        r = post(api, number, body, "same-key")
        assert r.status_code == 422 and field_errors(r) == errors, (body, r.get_json())
    malformed = api.post(f"/loyalty/members/{number}/transactions", data='{"type": ',
                         content_type="application/json", headers={"Idempotency-Key": "m-1"})
    assert malformed.status_code == 400 and problem_type(malformed) == "malformed-json"
    assert entries(session, number) == []
    # Nothing was kept for the key: the corrected request may use it.
    ok = post(api, number, {"type": "adjust", "points": 5, "reason": "x"}, "same-key")
    assert ok.status_code == 201 and "Idempotent-Replayed" not in ok.headers


# --- reversal ------------------------------------------------------------------------------------


def test_reverse_an_earn_and_a_redeem(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    order = earn(api, number, 300, "C-1")["entry"]["id"]
    spent = post(api, number, {"type": "redeem", "points": 100, "reason": "Mug"}, "r-mug")
    spent_id = spent.get_json()["entry"]["id"]

    refund = api.post(f"/loyalty/transactions/{spent_id}/reverse", {"reason": "Mug returned"},
                      headers={"Idempotency-Key": "rev-mug"})
    assert refund.status_code == 201, refund.get_json()
    answer = refund.get_json()
    assert answer["entry"]["type"] == "reversal" and answer["entry"]["reverses"] == spent_id
    assert answer["entry"]["points"] == 100 and answer["balance"] == 300
    replay = api.post(f"/loyalty/transactions/{spent_id}/reverse", {"reason": "Mug returned"},
                      headers={"Idempotency-Key": "rev-mug"})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.get_json() == answer
    twice = api.post(f"/loyalty/transactions/{spent_id}/reverse", {"reason": "Again"},
                     headers={"Idempotency-Key": "rev-mug-2"})
    assert twice.status_code == 409 and problem_type(twice) == "already-reversed"

    returned = api.post(f"/loyalty/transactions/{order}/reverse", {"reason": "Order returned"},
                        headers={"Idempotency-Key": "rev-order"})
    assert returned.status_code == 201 and returned.get_json()["balance"] == 0
    kinds = [e.kind for e in entries(session, number)]
    assert kinds == ["earn", "redeem", "reversal", "reversal"]
    row = session.scalars(select(Member).where(Member.member_number == number)).one()
    assert ledger.check_member(session, row) == []


def test_reverse_refusals(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    order = earn(api, number, 50, "D-1")["entry"]["id"]
    keyed = {"headers": {"Idempotency-Key": "rev-x"}}
    assert api.post("/loyalty/transactions/999999/reverse", {"reason": "x"},
                    **keyed).status_code == 404
    assert api.post("/loyalty/transactions/abc/reverse", {"reason": "x"},
                    **keyed).status_code == 404
    assert api.post(f"/loyalty/transactions/{2**65}/reverse", {"reason": "x"},
                    **keyed).status_code == 404
    missing = api.post(f"/loyalty/transactions/{order}/reverse", {"reason": "x"})
    assert missing.status_code == 400 and problem_type(missing) == "idempotency-key-missing"
    for body, errors in [({}, {"reason": "required"}), ({"reason": " "}, {"reason": "blank"}),
                         ({"reason": "x", "points": 5}, {"points": "unknown_field"}),
                         ({"reason": 5}, {"reason": "type"})]:
        r = api.post(f"/loyalty/transactions/{order}/reverse", body, **keyed)
        assert r.status_code == 422 and field_errors(r) == errors, body
    malformed = api.post(f"/loyalty/transactions/{order}/reverse", data="[",
                         content_type="application/json", **keyed)
    assert malformed.status_code == 400
    reversal = api.post(f"/loyalty/transactions/{order}/reverse", {"reason": "refund"},
                        **keyed).get_json()["entry"]["id"]
    again = api.post(f"/loyalty/transactions/{reversal}/reverse", {"reason": "undo"},
                     headers={"Idempotency-Key": "rev-y"})
    assert again.status_code == 422 and field_errors(again) == {"entry_id": "not_reversible"}
    assert len(entries(session, number)) == 2


# --- scopes, documentation ---------------------------------------------------------------------


def test_scopes(api):
    _, member = enroll(api)
    number = member["member_number"]
    reader = make_key(api.app, "decisions:read", name="reader")
    feed = make_key(api.app, "events:read", name="feed")
    writes = [
        ("/loyalty/members", {"customer": "cus_x", "terms_version": TERMS}),
        (f"/loyalty/members/{number}/transactions", {"type": "adjust", "points": 1,
                                                     "reason": "x"}),
        ("/loyalty/transactions/1/reverse", {"reason": "x"}),
    ]
    for path, body in writes:
        for key in (reader, feed):
            r = api.post(path, body, key=key, headers={"Idempotency-Key": "s-1"})
            assert r.status_code == 403 and problem_type(r) == "insufficient-scope", path
        r = api.client.post("/api/v1" + path, json=body)
        assert r.status_code == 401
        r = api.post(path, body, key="carnet_not-a-key")
        assert r.status_code == 401
    assert api.get(f"/loyalty/members/{number}", key=feed).status_code == 403
    assert api.client.get(f"/api/v1/loyalty/members/{number}").status_code == 401


def test_endpoints_are_in_the_openapi_document(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    paths = spec["paths"]
    assert set(paths["/api/v1/loyalty/members"]) == {"post"}
    assert set(paths["/api/v1/loyalty/members/{member_number}"]) == {"get"}
    post_op = paths["/api/v1/loyalty/members/{member_number}/transactions"]["post"]
    header = next(p for p in post_op["parameters"] if p["in"] == "header")
    assert header["name"] == "Idempotency-Key" and header["required"] is True
    assert header["schema"]["maxLength"] == 255
    body = post_op["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["type", "points", "reason"]
    assert body["additionalProperties"] is False
    assert {"201", "400", "401", "403", "404", "409", "422"} <= set(post_op["responses"])
    assert post_op["x-scopes"] == ["loyalty:write"]
    reverse = paths["/api/v1/loyalty/transactions/{entry_id}/reverse"]["post"]
    assert any(p["in"] == "header" for p in reverse["parameters"])
    read = paths["/api/v1/loyalty/members/{member_number}"]["get"]
    assert set(read["x-scopes"]) == {"decisions:read", "loyalty:write"}


# --- the change feed and webhooks --------------------------------------------------------------


def test_points_and_tier_changes_reach_the_feed_and_webhooks(api):
    api.app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"] = True  # the receiver is on 127.0.0.1
    receiver = WebhookReceiver().start()
    try:
        hook = api.post("/webhooks", {"url": receiver.url, "events": ["loyalty.*"]})
        assert hook.status_code == 201
        receiver.secret = hook.get_json()["secret"]
        start = api.get("/events").get_json()["next_cursor"]
        customer, member = enroll(api)
        number = member["member_number"]
        earn(api, number, 1200, "E-1")
        api.post("/customers", {"email": "not-loyalty@example.com"})
        feed = api.get(f"/events?after={start}").get_json()["events"]
        assert [e["type"] for e in feed] == [
            "customer.created", "loyalty.enrolled", "loyalty.tier_changed",
            "loyalty.points_changed", "customer.created"]
        feed = feed[1:]
        points = feed[2]
        assert points["customer"] == customer.public_id
        assert points["data"]["member_number"] == number
        assert points["data"]["delta"] == 1200 and points["data"]["balance"] == 1200
        assert feed[1]["data"]["tier"] == "silver"
        assert feed[1]["data"]["previous_tier"] == "bronze"

        assert worker.run_once(api.app, ["webhooks.deliver"])["webhooks.deliver"] == 3
        assert [e["type"] for e in receiver.received] == [
            "loyalty.enrolled", "loyalty.tier_changed", "loyalty.points_changed"]
        assert receiver.received[2]["data"]["entry_id"] == feed[2]["data"]["entry_id"]
        assert receiver.rejected == []
    finally:
        receiver.stop()


# --- purge of old keys ------------------------------------------------------------------------


def test_the_worker_forgets_old_keys(api, session):
    _, member = enroll(api)
    number = member["member_number"]
    body = {"type": "earn", "points": 10, "reason": "Order F-1", "source_ref": "F-1"}
    assert post(api, number, body, "old-key").status_code == 201
    assert post(api, number, {**body, "source_ref": "F-2"}, "new-key").status_code == 201
    session.execute(update(IdempotencyRecord).where(IdempotencyRecord.key == "old-key")
                    .values(created_at=utcnow() - timedelta(days=31)))
    assert worker.run_once(api.app, ["idempotency.purge"])["idempotency.purge"] == 1
    assert session.scalars(select(IdempotencyRecord.key)).all() == ["new-key"]
    # The old key is new again; the order still earns once.
    late = post(api, number, body, "old-key")
    assert late.status_code == 409 and "Idempotent-Replayed" not in late.headers
    assert post(api, number, {**body, "source_ref": "F-2"}, "new-key").headers[
        "Idempotent-Replayed"] == "true"


# --- concurrency (PostgreSQL, real commits) ----------------------------------------------------


def _race(app, path, body, key, headers, count):
    """``count`` threads send the same request at the same moment, each with its own client."""
    barrier = threading.Barrier(count)
    answers: list[tuple[int, dict, str | None]] = [None] * count  # type: ignore[list-item]

    def send(index):
        client = app.test_client()
        barrier.wait()
        r = client.post(path, json=body, headers={**headers, "Idempotency-Key": key})
        answers[index] = (r.status_code, r.get_json(), r.headers.get("Idempotent-Replayed"))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


@pytest.mark.parametrize("kind", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="needs CARNET_TEST_DATABASE_URL (PostgreSQL)"))])
def test_concurrent_identical_requests_write_once_and_answer_alike(kind, tmp_path):
    """Real commits from threads: on PostgreSQL the losers wait on the unique index of the
    key until the first commits, then replay it; SQLite serialises the writers."""
    with fresh_database(kind, tmp_path) as url:
        engine = make_engine(url)
        prepare_schema(engine)
        engine.dispose()
        app = create_app(app_config(tmp_path, DATABASE_URL=url))
        try:
            api = Api(app, app.test_client())
            _, member = enroll(api)
            number = member["member_number"]
            path = f"/api/v1/loyalty/members/{number}/transactions"
            auth = api.headers()
            earn(api, number, 500, "seed")
            for key, body in [
                ("race-earn", {"type": "earn", "points": 70, "reason": "Order G-1",
                               "source_ref": "G-1"}),
                ("race-redeem", {"type": "redeem", "points": 30, "reason": "Voucher"}),
                ("race-adjust", {"type": "adjust", "points": 5, "reason": "Goodwill"}),
            ]:
                answers = _race(app, path, body, key, auth, 8)
                assert all(a is not None for a in answers)
                assert {a[0] for a in answers} == {201}, answers
                assert all(a[1] == answers[0][1] for a in answers)
                assert sorted(a[2] or "" for a in answers) == [""] + ["true"] * 7
            with Session(app.extensions["carnet.db"]["bind"]) as s:
                assert [(e.kind, e.points) for e in entries(s, number)] == [
                    ("earn", 500), ("earn", 70), ("redeem", -30), ("adjust", 5)]
                row = s.scalars(select(Member).where(Member.member_number == number)).one()
                assert row.balance == 545 and ledger.check_member(s, row) == []
                assert s.scalar(select(func.count()).select_from(IdempotencyRecord)) == 4
        finally:
            app.extensions["carnet.db"]["bind"].dispose()



# --- cost --------------------------------------------------------------------------------------


def _statements(api, connection, number, body, key):
    """The SQL an accrual sends, without the SAVEPOINTs the test's outer transaction adds."""
    with counting(connection) as tally:
        r = post(api, number, body, key)
    assert r.status_code == 201, r.get_json()
    return [sql for sql in tally.statements if not sql.startswith(("SAVEPOINT", "RELEASE"))]


def test_an_accrual_costs_a_few_statements_whatever_the_history(api, connection):
    """Latency a till notices: authenticating the key, claiming the Idempotency-Key, finding
    and locking the member, appending the entry and its lot, moving the balance, the change
    feed and keeping the answer are one statement each. Nothing reads the member's history
    (no expiry scan, no tier-window sum) while nothing is due to expire and the cached
    window count is exact, so a long history costs the same."""
    _, member = enroll(api)
    number = member["member_number"]
    for n in range(12):
        earn(api, number, 50, f"H-{n}")
    post(api, number, {"type": "redeem", "points": 120, "reason": "Voucher"}, "h-redeem")
    cases = [
        ("earn", {"type": "earn", "points": 40, "reason": "Order", "source_ref": "N-1"}, 8),
        ("earn to the next tier", {"type": "earn", "points": 1000, "reason": "Order",
                                   "source_ref": "N-2"}, 9),
        ("adjust", {"type": "adjust", "points": 5, "reason": "Goodwill"}, 8),
        # a debit also reads the open lots (FIFO), takes from them and records from where
        ("redeem", {"type": "redeem", "points": 80, "reason": "Voucher"}, 11),
    ]
    for name, body, most in cases:
        sent = _statements(api, connection, number, body, f"cost-{name}")
        assert len(sent) <= most, (name, len(sent), sent)
