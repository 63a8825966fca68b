"""The API answers what its OpenAPI document says, case by case: what schemathesis found when it
ran with every check (test_api_schemathesis.py keeps running it)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

from portal.api.schema import FieldError
from portal.push.api import Url
from tests.conftest import app_config
from tests.support.api_client import Api, field_errors


@pytest.fixture
def app(connection, tmp_path):
    from portal import create_app
    from portal.push.webpush import generate_vapid_keys, save_vapid_private_key

    key_path = save_vapid_private_key(generate_vapid_keys(), tmp_path / "vapid.pem")
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                 VAPID_PRIVATE_KEY=str(key_path)))


@pytest.fixture
def api(app, client):
    return Api(app, client)


@pytest.fixture
def spec(api):
    return api.client.get("/api/v1/openapi.json").get_json()


def body_schema(spec: dict[str, Any], path: str, method: str = "post") -> Any:
    return spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]


def valid(schema: Any, value: Any) -> bool:
    return bool(jsonschema_rs.validator_for(schema).is_valid(value))


@pytest.mark.parametrize("path", ["/push/messages", "/wallet/messages"])
def test_a_null_audience_is_refused_not_a_server_error(api, path):
    body = {"topic": "offers", "audience": None, "title": "Sale", "header": "Sale",
            "body": "Today only"}
    body = {k: v for k, v in body.items() if k != ("header" if "push" in path else "title")}
    r = api.post(path, body)
    assert r.status_code == 422 and field_errors(r) == {"audience": "null"}


def test_a_405_names_the_methods_the_url_takes(api):
    r = api.call("TRACE", "/customers")
    assert r.status_code == 405 and r.mimetype == "application/problem+json"
    assert {m.strip() for m in r.headers["Allow"].split(",")} >= {"POST"}


def test_every_problem_answered_is_declared(spec):
    lookup = spec["paths"]["/api/v1/customers/lookup"]["get"]["responses"]
    assert "404" in lookup   # no customer with this identifier
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            if "requestBody" in op:
                assert {"400", "413", "415", "422"} <= responses.keys(), (method, path)
            if op["security"]:
                assert responses["401"]["headers"]["WWW-Authenticate"]["required"]
                assert responses["429"]["headers"]["Retry-After"]["required"]
            for code, answer in responses.items():
                if code >= "400":
                    assert list(answer["content"]) == ["application/problem+json"]
    enroll = spec["paths"]["/api/v1/loyalty/members"]["post"]["responses"]
    assert {"404", "409"} <= enroll.keys()


def test_the_lookup_groups_are_in_the_document_and_enforced(api, spec):
    [param] = spec["paths"]["/api/v1/customers/lookup"]["get"]["parameters"]
    schema = param["schema"]
    assert param["style"] == "form" and param["explode"]
    assert valid(schema, {"namespace": "crm", "value": "C-1"})
    assert not valid(schema, {"email": "a@example.com", "namespace": "crm"})
    r = api.get("/customers/lookup?email=a@example.com&namespace=crm")
    assert r.status_code == 422 and field_errors(r) == {"query": "exactly_one"}


def test_a_suppression_names_customer_or_address_in_the_document_too(spec):
    schema = body_schema(spec, "/api/v1/suppressions")
    base = {"channel": "email", "reason": "manual"}
    assert valid(schema, {**base, "address": "a@example.com"})
    assert valid(schema, {**base, "customer": {"email": "a@example.com"}})
    assert not valid(schema, {**base, "address": "a@example.com",
                              "customer": {"email": "a@example.com"}})
    assert not valid(schema, base)


def test_ledger_rules_are_in_the_document(spec):
    schema = body_schema(spec, "/api/v1/loyalty/members/{member_number}/transactions")
    earn = {"type": "earn", "points": 10, "reason": "Order", "source_ref": "1042"}
    assert valid(schema, earn)
    assert not valid(schema, {k: v for k, v in earn.items() if k != "source_ref"})
    assert not valid(schema, {**earn, "points": -10})
    assert not valid(schema, {**earn, "type": "adjust", "points": 0})
    assert valid(schema, {**earn, "type": "adjust", "points": -10})


def test_an_integral_number_is_an_integer(api):
    """JSON has numbers only: the document's integer admits 3600.0, and so does the API."""
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "Sale",
                                    "ttl": 3600.0})
    assert r.status_code == 202, r.get_json()
    r = api.post("/push/messages", {"topic": "offers", "audience": "all", "title": "Sale",
                                    "ttl": 3600.5})
    assert r.status_code == 422 and field_errors(r) == {"ttl": "type"}


@pytest.mark.parametrize("text", ["https://shop.example/a", "/offers", "https://shop.example/é",
                                  "http://a b", "http://a\x1eb", "http://a\x00b", "http://a\u00a0b",
                                  "http://a\u2028b", "http://a\ufeffb", "ftp://a"])
def test_a_url_pattern_means_the_same_to_the_api_and_the_document(text):
    errors: list[FieldError] = []
    Url.validate(text, "url", errors)
    assert valid(Url.schema(), text) == (not errors)


@pytest.mark.parametrize("text", ["plain", "with\x00nul"])
def test_a_nul_is_refused_by_the_document_as_by_the_api(spec, text):
    topic = body_schema(spec, "/api/v1/decisions")["properties"]["topic"]
    errors: list[FieldError] = []
    from portal.api.schemas import Topic

    Topic.validate(text, "topic", errors)
    assert valid(topic, text) == (not errors)


@pytest.mark.parametrize("key", ["order-1042", '"order-1042"', "a b", '""', "   ", "clé",
                                 "tab\there", '"'])
def test_an_idempotency_key_is_usable_exactly_when_the_document_says(api, spec, key):
    op = spec["paths"]["/api/v1/loyalty/transactions/{entry_id}/reverse"]["post"]
    [header] = [p for p in op["parameters"] if p["name"] == "Idempotency-Key"]
    r = api.post("/loyalty/transactions/999999/reverse", {"reason": "Refund"},
                 headers={"Idempotency-Key": key})
    assert (r.status_code != 400) == valid(header["schema"], key), r.get_json()
