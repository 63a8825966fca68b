"""Nobody sees or changes another person's data: not through the portal's pages, an export,
a wallet card, the PassKit web service, a push subscription, a link made for something else,
an expired or altered link, nor through an API key that lacks the right."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import re
import time
import zipfile
from typing import Any

import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import TimestampSigner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from portal.api import operations
from portal.api.core import Operation
from portal.core import tokens
from portal.core.tokens import PURPOSES, fingerprint
from portal.models.consent import ConsentEvent, ConsentState
from portal.models.customer import Customer
from portal.push.models import PushSubscription
from portal.services import api_keys
from portal.web.links import CONFIGURED_AGES
from tests.conftest import csrf_from
from tests.security.conftest import (
    PASSWORD,
    Person,
    is_signed_in,
    meta_token,
    page_token,
    row_counts,
    sign_in_by_link,
    signed_in_client,
)
from tests.support.api_client import make_key
from tests.support.apple_wallet import PASS_TYPE_ID
from tests.support.fake_push_service import make_fake_subscription

PASSKIT = "/wallet/apple/v1"
DEVICE = "6a44f1a5ca4a6f6a0ed5c8d1d7b7fe0b"


def secrets_of(person: Person) -> list[str]:
    """Strings that only this person's pages may show."""
    found = [person.email, person.public_id, person.customer.postal_address or "",
             person.customer.phone or ""]
    if person.member is not None:
        found.append(person.member.member_number)
    return [s for s in found if s]


def assert_shows_only(body: str, mine: Person, theirs: Person) -> None:
    for secret in secrets_of(theirs):
        assert secret not in body, f"{theirs.email}'s {secret!r} leaked to {mine.email}"


# --- the portal's pages ------------------------------------------------------------------------


PAGES = ["/preferences", "/preferences/history", "/account", "/account/delete", "/loyalty",
         "/loyalty/leave", "/push"]


def test_every_page_shows_the_signed_in_person_only(app, ann, bob):
    client = signed_in_client(app, bob.customer)
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 200, page
        assert_shows_only(response.get_data(as_text=True), bob, ann)
    assert bob.email in client.get("/account").get_data(as_text=True)
    assert bob.member is not None
    assert bob.member.member_number in client.get("/loyalty").get_data(as_text=True)


def test_naming_someone_else_in_the_query_or_form_is_ignored(app, ann, bob):
    client = signed_in_client(app, bob.customer)
    other = {"customer": ann.public_id, "cid": ann.public_id, "c": ann.public_id,
             "email": ann.email, "member_number": ann.member.member_number if ann.member else ""}
    for page in PAGES:
        response = client.get(page, query_string=other)
        assert response.status_code == 200
        # The language switcher sends back the page's own address (our query string): an echo.
        html = re.sub(r'name="next" value="[^"]*"', "", response.get_data(as_text=True))
        assert_shows_only(html, bob, ann)
    token = page_token(client, "/account")
    export = client.post("/account/export", query_string=other,
                         data={"csrf_token": token, "export_password": PASSWORD, **other})
    assert export.status_code == 200
    assert_shows_only(export.get_data(as_text=True), bob, ann)


def test_the_data_export_is_the_signed_in_persons_own(app, ann, bob):
    client = signed_in_client(app, bob.customer)
    response = client.post("/account/export", data={"csrf_token": page_token(client, "/account"),
                                                    "export_password": PASSWORD})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    data = response.get_data(as_text=True)
    assert bob.public_id in data and bob.email in data
    assert_shows_only(data, bob, ann)
    assert bob.public_id in response.headers["Content-Disposition"]


def test_the_export_needs_a_session_and_a_form_token(app, client, ann):
    anonymous = client.post("/account/export")
    assert anonymous.status_code in (302, 400)  # the log in page, or the form expired
    assert b"customer" not in anonymous.data
    signed_in = signed_in_client(app, ann.customer)
    refused = signed_in.post("/account/export")                # no CSRF token
    assert refused.status_code in (302, 400)
    assert ann.email not in refused.get_data(as_text=True)


def test_saving_preferences_with_someone_elses_id_changes_only_mine(app, session, ann, bob):
    def states(person: Person) -> dict[tuple[str, str], str]:
        session.expire_all()
        return {(s.topic_key, s.channel): s.state for s in session.scalars(
            select(ConsentState).where(ConsentState.customer_id == person.customer.id))}

    def events(person: Person) -> int:
        return int(session.scalar(select(func.count()).select_from(ConsentEvent).where(
            ConsentEvent.customer_id == person.customer.id)) or 0)

    before_states, before_events = states(ann), events(ann)
    client = signed_in_client(app, bob.customer)
    token = page_token(client, "/preferences")
    response = client.post("/preferences", query_string={"customer": ann.public_id}, data={
        "csrf_token": token, "customer": ann.public_id, "cid": ann.public_id,
        "c:offers:email": "on", "paused": "on"})
    assert response.status_code == 302
    assert states(ann) == before_states and events(ann) == before_events
    assert states(bob)[("*", "*")] == "withdrawn"
    response = client.post("/preferences/contact", data={
        "csrf_token": token, "customer": ann.public_id, "postal_address": "3 Mallory Lane"})
    assert response.status_code == 302
    session.expire_all()
    assert session.get(Customer, ann.customer.id).postal_address == "1 Ann Street, Annville"
    assert session.get(Customer, bob.customer.id).postal_address == "3 Mallory Lane"


def test_a_session_cookie_forged_with_another_key_signs_nobody_in(app, ann):
    forger = Flask("forger")
    forger.secret_key = "not-the-real-secret"
    serializer = SecureCookieSessionInterface().get_signing_serializer(forger)
    assert serializer is not None
    cookie = serializer.dumps({"cid": ann.public_id, "epoch": ann.customer.auth_epoch,
                               "method": "password", "at": int(time.time())})
    client = app.test_client()
    client.set_cookie("carnet_session", cookie)
    assert not is_signed_in(client)
    assert ann.email not in client.get("/account", follow_redirects=True).get_data(as_text=True)


def test_a_password_change_ends_every_other_session(app, session, ann):
    stolen = signed_in_client(app, ann.customer)
    assert is_signed_in(stolen)
    ann.customer.auth_epoch += 1
    session.add(ann.customer)
    session.commit()
    assert not is_signed_in(stolen)


# --- loyalty, wallet cards ---------------------------------------------------------------------


def pass_json(pkpass: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(pkpass)) as archive:
        return json.loads(archive.read("pass.json"))


def download_pass(app: Flask, person: Person) -> dict[str, Any]:
    response = signed_in_client(app, person.customer).get("/loyalty/wallet/apple.pkpass")
    assert response.status_code == 200
    return pass_json(response.data)


def test_the_wallet_download_is_always_the_signed_in_members_card(app, ann, bob):
    assert ann.member is not None and bob.member is not None
    client = signed_in_client(app, bob.customer)
    response = client.get("/loyalty/wallet/apple.pkpass",
                          query_string={"member": ann.member.member_number,
                                        "serial": ann.public_id})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "private, no-store"
    document = pass_json(response.data)
    text = json.dumps(document)
    assert bob.member.member_number in text
    assert ann.member.member_number not in text and ann.email not in text
    assert app.test_client().get("/loyalty/wallet/apple.pkpass").status_code == 302


def passkit_calls(serial: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    registration = f"{PASSKIT}/devices/{DEVICE}/registrations/{PASS_TYPE_ID}/{serial}"
    return [("GET", f"{PASSKIT}/passes/{PASS_TYPE_ID}/{serial}", None),
            ("POST", registration, {"pushToken": "a1" * 32}),
            ("DELETE", registration, None)]


def test_passkit_refuses_a_wrong_token_and_another_cards_token(app, ann, bob):
    mine, theirs = download_pass(app, bob), download_pass(app, ann)
    device = app.test_client()
    wrong = "W" * len(mine["authenticationToken"])
    cases = [
        (theirs["serialNumber"], mine["authenticationToken"]),   # someone else's card
        (mine["serialNumber"], wrong),                            # my card, a wrong token
        (mine["serialNumber"], theirs["authenticationToken"]),   # my card, their token
        (mine["serialNumber"], None),                             # no token at all
    ]
    for serial, token in cases:
        headers = {"Authorization": f"ApplePass {token}"} if token else {}
        for method, url, body in passkit_calls(serial):
            response = device.open(url, method=method, json=body, headers=headers)
            assert response.status_code == 401, (method, url, token)
            assert b"authenticationToken" not in response.data
    # The right token still works: the refusals above are about the token, not the route.
    right = {"Authorization": f"ApplePass {mine['authenticationToken']}"}
    method, url, body = passkit_calls(mine["serialNumber"])[0]
    assert device.open(url, method=method, headers=right).status_code == 200


def test_the_google_save_link_names_the_signed_in_member_only(app, ann, bob):
    assert ann.member is not None and bob.member is not None
    html = signed_in_client(app, bob.customer).get("/loyalty").get_data(as_text=True)
    match = re.search(r'href="(https://pay\.google\.com/gp/v/save/[^"]+)"', html)
    assert match, "no Google Wallet save link on the member page"
    claims_part = match.group(1).rsplit("/", 1)[-1].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=" * (-len(claims_part) % 4)))
    text = json.dumps(claims)
    assert bob.member.member_number in text
    assert ann.member.member_number not in text and ann.email not in text


# --- web push subscriptions --------------------------------------------------------------------


def subscribe(client, topics: list[str]) -> dict[str, Any]:
    subscription = make_fake_subscription("https://push.example.net")[0]
    response = client.post("/push/subscriptions", json={"subscription": subscription,
                                                        "topics": topics},
                           headers={"X-CSRFToken": meta_token(client)})
    assert response.status_code == 201, response.get_data(as_text=True)
    return subscription


def test_push_subscriptions_of_others_cannot_be_read_changed_or_removed(app, session, ann, bob):
    ann_client = signed_in_client(app, ann.customer)
    ann_sub = subscribe(ann_client, ["offers"])
    endpoint_hash = hashlib.sha256(ann_sub["endpoint"].encode()).hexdigest()
    before = row_counts(session)
    ann_consent = session.get(ConsentState, (ann.customer.id, "offers", "web_push"))
    assert ann_consent is not None and ann_consent.state == "granted"

    bob_client = signed_in_client(app, bob.customer)
    seen = bob_client.get("/push/subscription", query_string={"endpoint_hash": endpoint_hash})
    assert seen.status_code == 200
    assert seen.get_json()["mine"] is False and seen.get_json()["topics"] == []
    headers = {"X-CSRFToken": meta_token(bob_client)}
    # Only the endpoint itself (a secret the browser holds) names a subscription: its hash,
    # its public id or a guess do not.
    sub_row = session.scalars(select(PushSubscription).where(
        PushSubscription.endpoint == ann_sub["endpoint"])).one()
    for guess in (endpoint_hash, sub_row.public_id, "https://push.example.net/push/",
                  ann_sub["endpoint"] + "x"):
        gone = bob_client.delete("/push/subscriptions", json={"endpoint": guess},
                                 headers=headers)
        assert gone.status_code in (404, 422), guess
        renewed = bob_client.post("/push/subscriptions/renew", json={
            "old_endpoint": guess,
            "subscription": make_fake_subscription("https://push.example.net")[0]},
            headers=headers)
        assert renewed.status_code in (404, 422), guess
    # The endpoint itself is not enough either to have Ann's messages sent to Bob's browser.
    renewed = bob_client.post("/push/subscriptions/renew", json={
        "old_endpoint": ann_sub["endpoint"],
        "subscription": make_fake_subscription("https://push.example.net")[0]},
        headers=headers)
    assert renewed.status_code == 404
    # A visitor who is not signed in cannot take over or re-pick an account's subscription.
    visitor = app.test_client()
    taken = visitor.post("/push/subscriptions", json={"subscription": ann_sub, "topics": []},
                         headers={"X-CSRFToken": meta_token(visitor)})
    assert taken.status_code == 409
    assert row_counts(session) == before
    session.expire_all()
    assert session.get(ConsentState, (ann.customer.id, "offers", "web_push")).state == "granted"
    row = session.scalars(select(PushSubscription).where(
        PushSubscription.endpoint == ann_sub["endpoint"])).one()
    assert row.customer_id == ann.customer.id and row.expired_at is None


def test_push_json_endpoints_need_the_pages_csrf_token(app, session, ann):
    client = signed_in_client(app, ann.customer)
    subscription = make_fake_subscription("https://push.example.net")[0]
    before = row_counts(session)
    for method, headers in (("POST", {}), ("POST", {"X-CSRFToken": "forged"}),
                            ("DELETE", {})):
        body = ({"subscription": subscription, "topics": ["offers"]} if method == "POST"
                else {"endpoint": subscription["endpoint"]})
        response = client.open("/push/subscriptions", method=method, json=body,
                               headers=headers)
        assert response.status_code == 400
        assert response.mimetype == "application/problem+json"
    renewal = {"old_endpoint": subscription["endpoint"], "subscription": subscription}
    for headers in ({}, {"X-CSRFToken": "forged"}):
        response = client.post("/push/subscriptions/renew", json=renewal, headers=headers)
        assert response.status_code == 400
        assert response.mimetype == "application/problem+json"
    assert row_counts(session) == before


# --- links: purposes, expiry, tampering -------------------------------------------------------


ENDPOINTS = {
    "verify-email": "/verify/{}",
    "change-email": "/account/email/{}",
    "reset-password": "/reset/{}",
    "manage": "/m/{}",
    "confirm-identity": "/account/confirm/{}",
    "undo-email-change": "/account/email/undo/{}",
    "confirm-consent": "/confirm/{}",
    "unsubscribe": "/u/{}",
}


def payload_for(purpose: str, customer: Customer) -> dict[str, Any]:
    """A payload that purpose's endpoint would accept for ``customer``."""
    return {
        "verify-email": {"c": customer.public_id, "m": customer.email, "e": customer.auth_epoch},
        "change-email": {"c": customer.public_id, "m": customer.pending_email,
                         "e": customer.auth_epoch},
        "reset-password": {"c": customer.public_id, "f": fingerprint(customer.password_hash)},
        "manage": {"c": customer.public_id, "e": customer.auth_epoch},
        "confirm-identity": {"c": customer.public_id, "e": customer.auth_epoch,
                             "j": "link-id-confirm", "n": "settings"},
        "undo-email-change": {"c": customer.public_id, "m": "ann.old@example.com",
                              "j": "link-id-undo"},
        "confirm-consent": {"c": customer.public_id, "t": ["newsletter"]},
        "unsubscribe": {"c": customer.public_id, "t": "newsletter", "ch": "email"},
    }[purpose]


@pytest.fixture
def linked(session: Session, ann: Person) -> Customer:
    """Ann, with something for every link to act on: a pending address change and a
    pending email subscription."""
    ann.customer.pending_email = "ann.new@example.com"
    ann.customer.email_verified_at = None
    session.add(ann.customer)
    session.commit()
    return ann.customer


def use_link(client, purpose: str, token: str):
    """GET the link, and POST it too where a POST is what acts (unsubscribe, and the single-use
    links whose page shows a button: posted with that page's form token when it has one)."""
    url = ENDPOINTS[purpose].format(token)
    responses = [client.get(url)]
    if purpose == "unsubscribe":
        responses.append(client.post(url, data={"List-Unsubscribe": "One-Click"}))
    if purpose in ("confirm-identity", "undo-email-change"):
        html = responses[0].get_data(as_text=True)
        form = {"csrf_token": csrf_from(html)} if responses[0].status_code == 200 else {}
        responses.append(client.post(url, data=form))
    return responses


def assert_refused(app, client, session, before, responses, expect: str | None = None):
    for response in responses:
        assert response.status_code == 400, response.status_code
        assert response.mimetype == "text/html"
        html = response.get_data(as_text=True)
        assert "Traceback" not in html
        if expect:
            assert expect in html
    assert not is_signed_in(client)
    assert row_counts(session) == before


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_each_link_works_for_its_own_purpose(app, session, linked, purpose):
    """The control for the refusals below: the same payload, signed for the right purpose,
    is accepted."""
    client = app.test_client()
    token = tokens.make_token(app.config["SECRET_KEY"], purpose, payload_for(purpose, linked))
    for response in use_link(client, purpose, token):
        assert response.status_code in (200, 302), (purpose, response.status_code)


@pytest.mark.parametrize(("made_for", "used_as"),
                         [p for p in itertools.permutations(sorted(PURPOSES), 2)])
def test_a_link_made_for_one_purpose_never_works_for_another(app, session, linked, made_for,
                                                            used_as):
    with pytest.raises(tokens.TokenError):
        tokens.read_token(app.config["SECRET_KEY"], used_as,
                          tokens.make_token(app.config["SECRET_KEY"], made_for, {}))
    client = app.test_client()
    before = row_counts(session)
    token = tokens.make_token(app.config["SECRET_KEY"], made_for, payload_for(used_as, linked))
    assert_refused(app, client, session, before, use_link(client, used_as, token))


def make_old_token(monkeypatch, secret: str, purpose: str, payload: dict[str, Any],
                   age_seconds: int) -> str:
    """A token signed ``age_seconds`` ago: only the signer's clock is moved, and only while
    the token is made."""
    then = int(time.time()) - age_seconds
    with monkeypatch.context() as patch:
        patch.setattr(TimestampSigner, "get_timestamp", lambda self: then)
        return tokens.make_token(secret, purpose, payload)


def max_age(app: Flask, purpose: str) -> int:
    setting = CONFIGURED_AGES.get(purpose)
    return int(app.config[setting]) * 86400 if setting else PURPOSES[purpose]


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_an_expired_link_gets_a_clean_400(app, session, linked, monkeypatch, purpose):
    secret = app.config["SECRET_KEY"]
    payload = payload_for(purpose, linked)
    client = app.test_client()
    almost = make_old_token(monkeypatch, secret, purpose, payload, max_age(app, purpose) - 600)
    assert all(r.status_code in (200, 302) for r in use_link(client, purpose, almost)), \
        "a link just inside its lifetime must still work"
    client = app.test_client()
    session.rollback()
    before = row_counts(session)
    old = make_old_token(monkeypatch, secret, purpose, payload, max_age(app, purpose) + 600)
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.read_token(secret, purpose, old, max_age(app, purpose))
    assert_refused(app, client, session, before, use_link(client, purpose, old))


def tampered(token: str) -> dict[str, str]:
    payload, _, rest = token.partition(".")
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    return {
        "payload changed": f"{flipped}.{rest}",
        "signature changed": token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
        "signature cut": token.rsplit(".", 1)[0],
        "only the payload": payload,
        "appended": token + "x",
        "empty-ish": ".",
        "nul byte": token + "%00",
        "not ascii": token[:10] + "é漢" + token[10:],
        "very long": token + "A" * 20_000,
        "json, not signed": base64.urlsafe_b64encode(b'{"c":"x"}').decode().rstrip("="),
        "dots": "a.b.c.d.e",
    }


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_an_altered_or_forged_link_gets_a_clean_400(app, session, linked, purpose):
    secret = app.config["SECRET_KEY"]
    genuine = tokens.make_token(secret, purpose, payload_for(purpose, linked))
    forged = tokens.make_token("someone-elses-secret", purpose, payload_for(purpose, linked))
    client = app.test_client()
    before = row_counts(session)
    for name, token in {**tampered(genuine), "forged": forged}.items():
        responses = use_link(client, purpose, token)
        for response in responses:
            assert response.status_code in (400, 404), (name, response.status_code)
            assert "Traceback" not in response.get_data(as_text=True)
    assert not is_signed_in(client)
    assert row_counts(session) == before


def test_a_link_naming_another_customer_cannot_be_made_by_editing_mine(app, session, ann, bob):
    """Swapping the customer id inside a genuine link breaks its signature."""
    mine = tokens.make_token(app.config["SECRET_KEY"], "manage",
                             {"c": bob.public_id, "e": bob.customer.auth_epoch})
    _, _, signature = mine.partition(".")
    theirs = base64.urlsafe_b64encode(json.dumps(
        {"c": ann.public_id, "e": ann.customer.auth_epoch}, separators=(",", ":")).encode()
    ).decode().rstrip("=")
    client = app.test_client()
    assert client.get(f"/m/{theirs}.{signature}").status_code == 400
    assert not is_signed_in(client)
    sign_in_by_link(app, client, bob.customer)
    assert_shows_only(client.get("/account").get_data(as_text=True), bob, ann)


# --- the API: every operation, generated from the declarations -------------------------------


PATH_VALUES = {
    "customer_id": "cus_abcdefghijklmnop", "namespace": "crm", "value": "C-1042",
    "topic": "newsletter", "channel": "email", "webhook_id": "1",
    "member_number": "271804417365", "message_id": "pm_abcdef",
}


def url_of(operation: Operation) -> str:
    def fill(match: re.Match[str]) -> str:
        converter, name = match.group(1), match.group(2)
        if converter == "int:":
            return "1"
        return PATH_VALUES.get(name, "x1")

    return re.sub(r"<([a-z]+:)?([a-z_]+)>", fill, operation.rule)


def call(client, operation: Operation, headers: dict[str, str]):
    kwargs: dict[str, Any] = {"headers": {**headers, "Idempotency-Key": "security-test-1"}}
    if operation.body is not None:
        kwargs["json"] = {}
    return client.open(url_of(operation), method=operation.method, **kwargs)


OPS = operations()


def op_id(operation: Operation) -> str:
    return f"{operation.method} {operation.rule.removeprefix('/api/v1')}"


def test_every_operation_is_covered_and_declares_scopes():
    assert len(OPS) >= 31
    for operation in OPS:
        assert operation.scopes, f"{op_id(operation)} declares no scope: it would be public"


def assert_problem(response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status and body["type"].startswith("https://carnet.dev/problems/")
    return body


@pytest.mark.parametrize("operation", OPS, ids=op_id)
def test_an_operation_without_a_key_is_401(app, session, operation):
    client = app.test_client()
    before = row_counts(session)
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    {"Authorization": "Bearer carnet_not-a-real-key"},
                    {"Authorization": "Bearer " + "carnet_" + "A" * 300},
                    {"Authorization": "carnet_no-scheme"}):
        response = call(client, operation, headers)
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert row_counts(session) == before


@pytest.mark.parametrize("operation", OPS, ids=op_id)
def test_a_revoked_key_is_refused_at_once(app, session, operation):
    secret = make_key(app, *operation.scopes, name="soon-revoked")
    client = app.test_client()
    first = call(client, operation, {"Authorization": f"Bearer {secret}"})
    assert first.status_code not in (401, 403)
    first.get_data()
    first.close()  # a streamed answer holds a cursor on the test's shared connection
    with session.begin_nested():
        api_keys.revoke_key(session, "soon-revoked")
    session.commit()
    before = row_counts(session)
    response = call(client, operation, {"Authorization": f"Bearer {secret}"})
    assert_problem(response, 401)
    assert row_counts(session) == before


@pytest.mark.parametrize("operation", OPS, ids=op_id)
def test_a_key_without_the_operations_scope_is_403(app, session, operation):
    others = [s for s in api_keys.SCOPES if s not in operation.scopes]
    secret = make_key(app, *others, name="wrong-scopes")
    client = app.test_client()
    before = row_counts(session)
    response = call(client, operation, {"Authorization": f"Bearer {secret}"})
    body = assert_problem(response, 403)
    assert sorted(body["required_scopes"]) == sorted(operation.scopes)
    assert row_counts(session) == before
