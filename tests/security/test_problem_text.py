"""A body the parser chokes on gets a fixed, human sentence in its problem document: never the
text of the exception behind it (which names library internals, limits and settings)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.security.conftest import Person
from tests.support.api_client import Api

# Words of Python's own messages (the integer-digit limit, codecs, the JSON decoder).
EXCEPTION_WORDS = re.compile(
    r"sys\.|set_int_max_str_digits|Exceeds the limit|codec|can't decode|position \d|"
    r"invalid start byte|Expecting|Traceback|Error\b|recursion", re.IGNORECASE)

WRITES = [
    ("POST", "/decisions"),
    ("POST", "/customers"),
    ("POST", "/loyalty/members"),
    ("POST", "/suppressions"),
    ("POST", "/unsubscribe-links"),
    ("POST", "/decisions/batch"),
]
HUGE_NUMBER = b'{"topic": "newsletter", "channel": "email", "count": ' + b"9" * 5000 + b"}"
BODIES = {
    "5000-digit integer": (HUGE_NUMBER, "too many digits"),
    "5000-digit integer in an array": (b"[" + b"1" * 5000 + b"]", "too many digits"),
    "invalid UTF-8": (b'{"topic": "\xff\xfe news"}', "not valid UTF-8"),
    "latin-1 text": ('{"email": "léa@example.com"}'.encode("latin-1"), "not valid UTF-8"),
    "nested past the stack": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "not JSON": (b"{nope", "not valid JSON"),
}


@pytest.fixture
def api(app: Flask, client: FlaskClient) -> Api:
    return Api(app, client)


def assert_fixed_sentence(response: Any, expected: str) -> None:
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["type"].endswith("/malformed-json")
    text = " ".join(str(body.get(k, "")) for k in ("title", "detail", "errors"))
    assert expected in body["detail"]
    assert not EXCEPTION_WORDS.search(text), text
    assert len(body["detail"]) < 120


@pytest.mark.parametrize("name", list(BODIES))
@pytest.mark.parametrize("method, path", WRITES, ids=[p for _, p in WRITES])
def test_unreadable_bodies_get_a_fixed_sentence(api: Api, method: str, path: str,
                                                name: str) -> None:
    raw, expected = BODIES[name]
    response = api.call(method, path, data=raw, content_type="application/json",
                        headers={"Idempotency-Key": f"k-{name}"})
    assert_fixed_sentence(response, expected)


def test_the_same_body_always_gets_the_same_sentence(api: Api) -> None:
    details = {api.post("/decisions", data=HUGE_NUMBER.replace(b"9" * 5000, b"8" * n),
                        content_type="application/json").get_json()["detail"]
               for n in (4400, 5000, 9000)}
    assert len(details) == 1


def test_a_lone_surrogate_is_refused_not_a_crash(api: Api, ann: Person) -> None:
    raw = b'{"customer": {"email": "a\\ud800@example.com"}, "topic": "newsletter", ' \
          b'"channel": "email"}'
    assert_fixed_sentence(api.post("/decisions", data=raw, content_type="application/json"),
                          "not valid Unicode")
    created = api.post("/customers", data=b'{"email": "x\\udfff@example.com"}',
                       content_type="application/json")
    assert_fixed_sentence(created, "not valid Unicode")


def test_http_errors_under_the_api_keep_their_fixed_descriptions(client: FlaskClient) -> None:
    response = client.open("/api/v1/decisions", method="PUT")
    assert response.status_code == 405
    assert response.get_json()["detail"] == (
        "The method is not allowed for the requested URL.")
