"""Keys, scopes, content types and validation, checked on every operation of the registry."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from portal.api import operations
from portal.core.db import new_session
from portal.models.api import ApiKey
from tests.support.api_client import Api, field_errors, make_key

OPERATIONS = operations()
SECURED = [op for op in OPERATIONS if op.scopes]


def concrete(op):
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: "1" if "int:" in m.group(0) else "x",
                  op.rule)


def ids(op):
    return f"{op.method} {op.rule}"


@pytest.fixture
def api(app, client):
    return Api(app, client)


def test_every_operation_is_declared_with_scopes():
    assert len(SECURED) >= 20
    assert all(op.responses for op in SECURED)


@pytest.mark.parametrize("op", SECURED, ids=ids)
def test_missing_or_bad_key_is_401_with_www_authenticate(client, op):
    for headers in ({}, {"Authorization": "Bearer carnet_not-a-real-key"},
                    {"Authorization": "Basic abc"}):
        r = client.open(concrete(op), method=op.method, headers=headers, json={})
        assert r.status_code == 401, (op.rule, r.get_json())
        assert r.mimetype == "application/problem+json"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.get_json()["type"] == "https://carnet.dev/problems/unauthorized"


@pytest.mark.parametrize("op", SECURED, ids=ids)
def test_wrong_scope_is_403(app, client, op):
    others = [s for s in ("loyalty:write", "push:send") if s not in op.scopes]
    key = make_key(app, *others, name="other-scopes")
    r = client.open(concrete(op), method=op.method, json={},
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    body = r.get_json()
    assert body["type"].endswith("/insufficient-scope")
    assert set(body["required_scopes"]) == set(op.scopes)


BODY_OPS = [op for op in SECURED if op.body is not None]


@pytest.mark.parametrize("op", BODY_OPS, ids=ids)
def test_bad_bodies(api, op):
    path = concrete(op)
    headers = api.headers(**{"Content-Type": "text/plain"})
    r = api.client.open(path, method=op.method, data="{}", headers=headers)
    assert r.status_code == 415 and r.get_json()["type"].endswith("/unsupported-media-type")
    headers = api.headers(**{"Content-Type": "application/json"})
    r = api.client.open(path, method=op.method, data="{not json", headers=headers)
    assert r.status_code == 400 and r.get_json()["type"].endswith("/malformed-json")
    r = api.client.open(path, method=op.method, json={"surprise": 1}, headers=api.headers())
    assert r.status_code == 422
    errors = field_errors(r)
    assert errors["surprise"] == "unknown_field"
    for name in op.body.required:
        assert errors[name] == "required"
    r = api.client.open(path, method=op.method, json=[1, 2], headers=api.headers())
    assert r.status_code == 422 and field_errors(r) == {"body": "type"}


def test_markup_the_caller_sent_comes_back_escaped_and_reads_back_the_same(api):
    name = "<script>alert('x')</script>&"
    r = api.post("/decisions", {name: 1, "topic": "t", "channel": "email",
                                "customer": {"email": "a@b.c"}})
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    raw = r.get_data(as_text=True)
    assert "<" not in raw and ">" not in raw and "&" not in raw and "'" not in raw
    assert "\\u003cscript\\u003e" in raw
    assert field_errors(r) == {name: "unknown_field"}


@pytest.mark.parametrize("op", [op for op in SECURED if op.query is not None], ids=ids)
def test_unknown_query_parameters_are_refused(api, op):
    r = api.client.open(concrete(op) + "?bogus=1", method=op.method, headers=api.headers())
    assert r.status_code == 422 and field_errors(r)["bogus"] == "unknown_field"


def test_field_errors_name_nested_fields(api):
    r = api.post("/decisions", {"customer": {"email": "a@b.c", "phone": "1"},
                                "topic": "", "channel": "email", "at": "yesterday"})
    assert r.status_code == 422
    assert field_errors(r) == {"customer": "exactly_one", "topic": "required",
                               "at": "format"}
    r = api.post("/decisions", {"customer": {"external_id": {"namespace": "crm"}},
                                "topic": "t", "channel": "email", "at": "2026-01-01T10:00"})
    assert field_errors(r) == {"customer.external_id.value": "required",
                               "at": "timezone_required"}
    assert r.get_json()["type"] == "https://carnet.dev/problems/invalid-request"


def test_revoked_key_fails_at_once_and_use_is_recorded_cheaply(app, client):
    from portal.services import api_keys

    key = make_key(app, "decisions:read", name="crm")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"customer": {"email": "x@example.com"}, "topic": "account", "channel": "email"}
    assert client.post("/api/v1/decisions", json=body, headers=headers).status_code == 200
    session = new_session(app)
    row = session.query(ApiKey).filter_by(name="crm").one()
    first_use = row.last_used_at
    assert first_use is not None and row.key_hash == api_keys.digest(key)
    assert key not in repr(row.__dict__)
    session.close()
    client.post("/api/v1/decisions", json=body, headers=headers)
    session = new_session(app)
    assert session.query(ApiKey).filter_by(name="crm").one().last_used_at == first_use
    session.close()
    session = new_session(app)
    with session.begin():
        api_keys.revoke_key(session, "crm")
    session.close()
    r = client.post("/api/v1/decisions", json=body, headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("customer", [{"email": "known@example.com"},
                                      {"external_id": {"namespace": "crm", "value": "42"}}])
def test_a_decision_reads_its_key_with_the_decision_and_answers_as_any_operation(
        app, client, customer):
    """A single decision reads the caller's key in its own statement; what the caller sees
    is what every operation answers: 401 for no key, an unknown or a revoked one, whatever
    the body; 403 without the scope; 422 for a bad body only with a good key; the use of
    the key recorded."""
    from portal.models.customer import ExternalId
    from portal.services import api_keys
    from portal.services.accounts import create_customer

    session = new_session(app)
    with session.begin():
        person = create_customer(session, "known@example.com")
        session.add(ExternalId(customer_id=person.id, namespace="crm", value="42"))
    session.close()
    good = {"customer": customer, "topic": "account", "channel": "email"}
    key = make_key(app, "decisions:read", name="sender")
    other = make_key(app, "events:read", name="reader")

    def post(secret, body):
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return client.post("/api/v1/decisions", json=body, headers=headers)

    for secret in (None, "carnet_" + "x" * 43, "not-a-key"):
        for body in (good, {"topic": ""}):
            r = post(secret, body)
            assert r.status_code == 401, (secret, body, r.get_json())
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = post(other, good)
    assert r.status_code == 403 and r.get_json()["required_scopes"] == ["decisions:read"]
    assert post(other, {"topic": ""}).status_code == 403
    assert post(key, {"topic": ""}).status_code == 422
    r = post(key, good)
    assert r.status_code == 200 and r.get_json()["reason"] == "required_service"
    assert r.get_json()["contact"] == {"email": "known@example.com"}
    session = new_session(app)
    with session.begin():
        assert session.query(ApiKey).filter_by(name="sender").one().last_used_at is not None
        api_keys.revoke_key(session, "sender")
    session.close()
    assert post(key, good).status_code == 401


def test_rate_limit_per_key_answers_429_with_retry_after(connection, tmp_path):
    from portal import create_app
    from tests.conftest import app_config

    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, API_RATE_LIMIT="3/60"))
    client = app.test_client()
    a, b = make_key(app, "events:read", name="a"), make_key(app, "events:read", name="b")
    codes = [client.get("/api/v1/events", headers={"Authorization": f"Bearer {a}"}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = client.get("/api/v1/events", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert r.get_json()["type"].endswith("/rate-limited")
    assert client.get("/api/v1/events",
                      headers={"Authorization": f"Bearer {b}"}).status_code == 200
    # a single decision reads its key in its own statement: the same limit, the same answer,
    # whether the body is valid or not
    sender = make_key(app, "decisions:read", name="sender")
    body = {"customer": {"email": "x@example.com"}, "topic": "account", "channel": "email"}
    codes = [client.post("/api/v1/decisions", json=body if i % 2 else {"topic": ""},
                         headers={"Authorization": f"Bearer {sender}"}).status_code
             for i in range(5)]
    assert codes == [422, 200, 422, 429, 429]
    r = client.post("/api/v1/decisions", json=body,
                    headers={"Authorization": f"Bearer {sender}"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


def test_cli_creates_lists_and_revokes_keys(app):
    runner = CliRunner()
    from portal.api.cli import api_keys_cli

    with app.app_context():
        out = runner.invoke(api_keys_cli, ["create", "shop", "--scope", "decisions:read",
                                           "--scope", "events:read"])
        assert out.exit_code == 0, out.output
        secret = out.output.strip().splitlines()[-1]
        assert secret.startswith("carnet_") and len(secret) > 40
        listed = runner.invoke(api_keys_cli, ["list"]).output
        assert "shop" in listed and secret not in listed and "decisions:read" in listed
        bad = runner.invoke(api_keys_cli, ["create", "x", "--scope", "everything"])
        assert bad.exit_code != 0 and "unknown scope" in bad.output
        assert runner.invoke(api_keys_cli, ["revoke", "shop"]).exit_code == 0
        assert "revoked" in runner.invoke(api_keys_cli, ["list"]).output


def test_openapi_document_is_built_from_the_validators(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"] == "3.1.0"
    body = spec["paths"]["/api/v1/decisions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert body["additionalProperties"] is False
    assert set(body["required"]) == {"customer", "topic", "channel"}
    assert body["properties"]["customer"]["maxProperties"] == 1
    batch = spec["paths"]["/api/v1/decisions/batch"]["post"]
    assert batch["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "items"]["maxItems"] == 10_000
    assert batch["security"] == [{"bearer": ["decisions:read"]}]
    assert "422" in batch["responses"] and "401" in batch["responses"]
    assert len([m for p in spec["paths"].values() for m in p]) == len(OPERATIONS)


def test_docs_page_is_self_contained_under_the_csp(client):
    r = client.get("/api/docs")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "POST" in html and "/api/v1/decisions/batch" in html
    assert "<script" not in html and "http://" not in html.replace("http://localhost", "")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


def test_unknown_api_path_is_a_problem(api):
    r = api.get("/nothing-here")
    assert r.status_code == 404 and r.mimetype == "application/problem+json"


def test_a_browser_signed_in_to_the_portal_can_call_the_api(app, api):
    """The portal's session cookie rides along (same origin, API docs tried in a browser):
    the API ignores it instead of failing."""
    from portal.web.links import manage_link
    from tests.conftest import path_of

    customer = api.customer("signed-in@example.com")
    with app.test_request_context():
        link = path_of(manage_link(customer))
    assert api.client.get(link).status_code == 302
    assert api.client.get_cookie("carnet_session") is not None
    r = api.post("/decisions", {"customer": {"id": customer.public_id}, "topic": "offers",
                                "channel": "email"})
    assert r.status_code == 200, r.get_json()
