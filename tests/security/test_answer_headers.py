"""What every answer tells caches and clients: the OpenAPI document names the configured
address whatever Host a request forges, a 405 names the methods allowed, and nothing about a
person is kept by a cache (pages seen signed in, the account's pages, the API)."""

from __future__ import annotations

import pytest
from flask import Flask

from tests.security.conftest import Person, page_token, signed_in_client
from tests.support.api_client import Api

HOSTILE_HOSTS = ["evil.example", "evil.example:8443", "localhost@evil.example"]


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_the_openapi_document_names_the_configured_address_not_the_host_header(
        app: Flask, host: str) -> None:
    app.config["BASE_URL"] = "https://carnet.example.org/"
    client = app.test_client()
    response = client.get("/api/v1/openapi.json", headers={"Host": host})
    assert response.status_code == 200
    assert response.get_json()["servers"] == [{"url": "https://carnet.example.org"}]
    assert "evil" not in response.get_data(as_text=True)
    docs = client.get("/api/docs", headers={"Host": host})
    assert docs.status_code == 200 and "evil" not in docs.get_data(as_text=True)


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/login", {"GET", "POST"}),
    ("PUT", "/preferences", {"GET", "POST"}),
    ("GET", "/account/export", {"POST"}),
    ("POST", "/healthz", {"GET"}),
    ("PUT", "/api/v1/webhooks", {"GET", "POST"}),
    ("DELETE", "/api/v1/decisions", {"POST"}),
    ("GET", "/api/v1/unsubscribe-links", {"POST"}),
    ("PATCH", "/api/v1/customers/cus_x", {"GET"}),
    ("GET", "/wallet/apple/v1/log", {"POST"}),
])
def test_every_405_names_the_allowed_methods(app: Flask, method: str, path: str,
                                             allowed: set[str]) -> None:
    response = app.test_client().open(path, method=method)
    assert response.status_code == 405
    named = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= named and method not in named
    if path.startswith(("/api/", "/wallet/")):
        assert response.mimetype == "application/problem+json"


def test_pages_seen_signed_in_are_never_cached(app: Flask, ann: Person) -> None:
    client = signed_in_client(app, ann.customer)
    for page in ("/", "/preferences", "/preferences/history", "/account", "/loyalty", "/push",
                 "/account/delete", "/nothing-here"):
        response = client.get(page)
        assert response.headers.get("Cache-Control") == "no-store", page
    saved = client.post("/account/export", data={"csrf_token": page_token(client, "/account")})
    assert saved.headers["Cache-Control"] == "no-store"
    # the site's static files stay cacheable for everyone
    with client.get("/static/css/carnet.css") as static:
        assert static.status_code == 200
        assert "no-store" not in (static.headers.get("Cache-Control") or "")


def test_account_pages_are_never_cached_even_signed_out(app: Flask) -> None:
    client = app.test_client()
    for page in ("/account", "/preferences", "/loyalty", "/account/delete", "/m/not-a-token",
                 "/u/not-a-token"):
        assert client.get(page).headers.get("Cache-Control") == "no-store", page
    assert "no-store" not in (client.get("/healthz").headers.get("Cache-Control") or "")


def test_api_answers_about_people_are_never_cached(app: Flask, client, ann: Person) -> None:
    api = Api(app, client)
    answers = [
        api.get(f"/customers/{ann.public_id}"),
        api.get("/customers/lookup", query_string={"email": ann.email}),
        api.get(f"/customers/{ann.public_id}/preferences"),
        api.post("/decisions", {"customer": {"email": ann.email}, "topic": "newsletter",
                                "channel": "email"}),
        api.get("/events"),
        api.get("/customers/cus_missing"),  # a problem too
        client.get("/api/v1/customers/lookup"),  # no key
    ]
    for response in answers:
        assert response.headers.get("Cache-Control") == "no-store", response.request.path
    assert answers[0].status_code == 200 and answers[3].status_code == 200
    public = client.get("/api/v1/openapi.json")
    assert public.headers["Cache-Control"] == "public, max-age=300"
