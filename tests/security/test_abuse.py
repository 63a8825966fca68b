"""Abuse: rate limits on log in, link requests, sign up and API keys (429 with Retry-After),
with the in-memory backend and with Redis; and no account enumeration through answer times.
The database store and concurrency are in tests/integration/test_rate_limits.py."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from portal import create_app
from portal.wallet_ws.issuer import apple_wallet
from tests.conftest import Outbox, csrf_from
from tests.security.conftest import full_config, make_person, row_counts
from tests.support.api_client import make_key

REDIS_URL = os.environ.get("CARNET_REDIS_URL") or "redis://127.0.0.1:6379/15"
LIMITS = {"LOGIN_RATE_LIMIT": "3/300", "LOGIN_ADDRESS_RATE_LIMIT": "5/3600",
          "LINK_RATE_LIMIT": "2/900", "SIGNUP_RATE_LIMIT": "2/3600", "API_RATE_LIMIT": "3/60"}


def redis_client() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({exc}); the Redis rate-limit "
                    "backend is tested only where a Redis server runs")
    return client


class Run:
    """One test's unique mark, in every address and IP it uses and in the prefix of the Redis
    keys it creates, so that they are its own and can be removed without touching anyone
    else's."""

    def __init__(self) -> None:
        self.mark = uuid.uuid4().hex[:12]
        self.prefix = f"carnet-test:{self.mark}:"
        number = int(self.mark[:6], 16)
        self.ip = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"

    def email(self, name: str) -> str:
        return f"{name}.{self.mark}@example.com"


@pytest.fixture(params=["memory", "redis", "redis-down"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str | None, Run]]:
    run = Run()
    if request.param == "memory":
        yield None, run
        return
    if request.param == "redis-down":
        # Nothing listens on port 1: every Redis call fails at once, and the limits must
        # still hold (counted in memory) with no error for the person logging in.
        yield "redis://127.0.0.1:1/0", run
        return
    client = redis_client()
    yield REDIS_URL, run
    for key in client.scan_iter(match=f"{run.prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def limited(connection: Connection, tmp_path: Path, apple_paths, google_key, backend
            ) -> Iterator[tuple[Flask, Run]]:
    url, run = backend
    app = create_app(full_config(tmp_path, connection, apple_paths, google_key,
                                 REDIS_URL=url, RATE_LIMIT_KEY_PREFIX=run.prefix, **LIMITS))
    kind = type(app.extensions["carnet.ratelimit"].backend).__name__
    assert kind == ("RedisBackend" if url else "MemoryBackend")
    yield app, run
    apple_wallet(app).close()


def client_from(app: Flask, run: Run, ip: str | None = None) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = ip or run.ip
    return client


def post(client: FlaskClient, url: str, data: dict[str, str]) -> Any:
    token = csrf_from(client.get(url).get_data(as_text=True))
    return client.post(url, data={"csrf_token": token, **data})


def assert_throttled(response: Any, window: int) -> None:
    assert response.status_code == 429
    wait = int(response.headers["Retry-After"])
    assert 0 < wait <= window
    assert "Too many attempts" in response.get_data(as_text=True)


def test_log_in_is_limited_per_address_and_ip(limited, session):
    app, run = limited
    person = make_person(session, run.email("lea"), member=False)
    client = client_from(app, run)
    for _ in range(3):
        assert post(client, "/login", {"email": person.email,
                                       "password": "wrong password"}).status_code == 401
    # Even the right password is refused now: the limit is not a hint about the password.
    assert_throttled(post(client, "/login", {"email": person.email,
                                             "password": "correct horse 1"}), 300)
    assert client.get("/preferences").status_code == 302
    # Another address from the same place, or this address from elsewhere, still works.
    assert post(client, "/login", {"email": run.email("other"),
                                   "password": "wrong password"}).status_code == 401
    elsewhere = client_from(app, run, run.ip + "1")
    assert post(elsewhere, "/login", {"email": person.email,
                                      "password": "correct horse 1"}).status_code == 302


def test_log_in_is_limited_per_address_from_any_ip(limited, session):
    """Many IPs (a botnet, or one attacker rotating addresses) share one budget per address:
    5 here, whatever the (address, IP) limit allows each of them."""
    app, run = limited
    person = make_person(session, run.email("ines"), member=False)
    for n in range(5):
        client = client_from(app, run, f"{run.ip}{n}")
        assert post(client, "/login", {"email": person.email,
                                       "password": "wrong password"}).status_code == 401
    fresh = client_from(app, run, "192.0.2.77")
    # The client's IP is the connection's: a forwarded header changes nothing.
    fresh.environ_base["HTTP_X_FORWARDED_FOR"] = "203.0.113.9"
    assert_throttled(post(fresh, "/login", {"email": person.email,
                                            "password": "correct horse 1"}), 3600)
    assert fresh.get("/preferences").status_code == 302
    # Other addresses are not affected.
    assert post(fresh, "/login", {"email": run.email("other"),
                                  "password": "wrong password"}).status_code == 401
    if app.config["REDIS_URL"] and "6379" in app.config["REDIS_URL"]:
        # The counters' keys name neither the address nor the IP.
        keys = [k.decode() for k in redis_client().scan_iter(match=f"{run.prefix}*")]
        assert any(k.startswith(f"{run.prefix}login_address:") for k in keys)
        assert not [k for k in keys if run.mark in k.removeprefix(run.prefix)
                    or "ines" in k or run.ip in k]


@pytest.mark.parametrize("url", ["/link", "/forgot"])
def test_link_requests_are_limited_per_address(limited, session, url):
    app, run = limited
    person = make_person(session, run.email("max"), member=False)
    outbox = Outbox(Path(app.instance_path) / "outbox")
    client = client_from(app, run)
    for _ in range(2):
        assert post(client, url, {"email": person.email}).status_code == 200
    sent = len(outbox.messages())
    assert sent == 2
    assert_throttled(post(client, url, {"email": person.email}), 900)
    # The other link page counts against the same address.
    other = "/forgot" if url == "/link" else "/link"
    assert_throttled(post(client_from(app, run), other, {"email": person.email}), 900)
    assert len(outbox.messages()) == sent
    # An unknown address is limited alike: the limit says nothing about accounts.
    for _ in range(2):
        assert post(client, url, {"email": run.email("nobody")}).status_code == 200
    assert_throttled(post(client, url, {"email": run.email("nobody")}), 900)


def test_sign_up_is_limited_per_ip(limited, session):
    app, run = limited
    client = client_from(app, run)
    for name in ("a", "b"):
        response = post(client, "/signup", {"email": run.email(name),
                                            "password": "correct horse 1",
                                            "confirm": "correct horse 1"})
        assert response.status_code == 200
    before = row_counts(session)
    assert_throttled(post(client, "/signup", {"email": run.email("c"),
                                              "password": "correct horse 1",
                                              "confirm": "correct horse 1"}), 3600)
    assert row_counts(session) == before
    elsewhere = client_from(app, run, run.ip + "1")
    assert post(elsewhere, "/signup", {"email": run.email("d"), "password": "correct horse 1",
                                       "confirm": "correct horse 1"}).status_code == 200


def test_an_api_key_is_limited(limited, session):
    app, run = limited
    secret = make_key(app, "decisions:read", name=f"limited-{run.mark}")
    # Key ids repeat between runs (rolled back): the run's own key prefix keeps them apart.
    client = app.test_client()
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"customer": {"email": run.email("x")}, "topic": "newsletter", "channel": "email"}
    for _ in range(3):
        assert client.post("/api/v1/decisions", json=body, headers=headers).status_code == 200
    response = client.post("/api/v1/decisions", json=body, headers=headers)
    assert response.status_code == 429
    assert response.mimetype == "application/problem+json"
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # Another key is counted apart.
    other = make_key(app, "decisions:read", name=f"other-{run.mark}")
    assert client.post("/api/v1/decisions", json=body,
                       headers={"Authorization": f"Bearer {other}"}).status_code == 200


# --- no account enumeration through answer times ---------------------------------------------


TRIES = 20


def timed(client: FlaskClient, url: str, data: dict[str, str], token: str) -> float:
    start = time.perf_counter()
    response = client.post(url, data={"csrf_token": token, **data})
    elapsed = time.perf_counter() - start
    assert response.status_code in (200, 401), response.status_code
    return elapsed


def compare(client: FlaskClient, url: str, known: dict[str, str],
            unknown: dict[str, str]) -> tuple[float, float]:
    token = csrf_from(client.get(url).get_data(as_text=True))
    for _ in range(2):  # warm up: templates compiled, connections made
        timed(client, url, known, token)
        timed(client, url, unknown, token)
    hits: list[float] = []
    misses: list[float] = []
    for _ in range(TRIES):  # interleaved, so drift in machine load hits both alike
        hits.append(timed(client, url, known, token))
        misses.append(timed(client, url, unknown, token))
    return statistics.median(hits), statistics.median(misses)


@pytest.fixture
def timing_app(connection: Connection, tmp_path: Path, apple_paths,
               google_key) -> Iterator[Flask]:
    app = create_app(full_config(tmp_path, connection, apple_paths, google_key,
                                 REDIS_URL=None, LOGIN_RATE_LIMIT="100000/60",
                                 LOGIN_ADDRESS_RATE_LIMIT="100000/60",
                                 LINK_RATE_LIMIT="100000/60"))
    yield app
    apple_wallet(app).close()


def test_log_in_takes_as_long_for_an_unknown_address(production_password_cost, timing_app,
                                                     session: Session):
    """A statistical check, not an exact one. An attacker who could tell "no such account"
    from "wrong password" by the answer time could list our customers. Both paths must do
    the same expensive work: one argon2 verification (against a dummy hash when the address
    is unknown), which dwarfs everything else. We time 20 interleaved attempts of each kind
    at the real hashing cost (the rest of the suite hashes cheaply) and compare medians
    (robust to the odd slow request on a busy machine). Without the dummy verification the
    unknown path would be ~50-100x faster; the accepted band, 0.5x to 2x, is generous enough
    never to flake on noise and still fails on any real difference."""
    person = make_person(session, "timing@example.com", member=False)
    hit, miss = compare(timing_app.test_client(), "/login",
                        {"email": person.email, "password": "wrong password 1"},
                        {"email": "nobody.here@example.com", "password": "wrong password 1"})
    assert 0.5 <= miss / hit <= 2.0, f"known {hit * 1000:.1f} ms, unknown {miss * 1000:.1f} ms"


@pytest.mark.parametrize("url", ["/forgot", "/link"])
def test_link_requests_take_as_long_for_an_unknown_address(timing_app, session, url):
    """The same statistical check for the forgotten password and sign-in link pages. A known
    address gets an email; the page answers the same words either way, and must take about
    the same time too: the unknown path signs a link and renders the message as well (never
    sending it), and SMTP delivery happens after the answer. Medians of 20 interleaved tries
    must be within 0.5x-2x; before that change the known path took ~3x as long."""
    person = make_person(session, "timing@example.com", member=False)
    hit, miss = compare(timing_app.test_client(), url, {"email": person.email},
                        {"email": "nobody.here@example.com"})
    assert 0.5 <= miss / hit <= 2.0, f"known {hit * 1000:.1f} ms, unknown {miss * 1000:.1f} ms"
    outbox = Outbox(Path(timing_app.instance_path) / "outbox")
    assert {m["To"] for m in outbox.messages()} == {person.email}  # the decoy is never sent


class RemoteTransport:
    """Stands for SMTP: a network round trip, so link pages deliver after the answer."""

    local = False

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("url", ["/forgot", "/link"])
def test_over_smtp_the_link_email_leaves_after_the_answer(timing_app, session, url):
    person = make_person(session, "smtp@example.com", member=False)
    transport = RemoteTransport()
    timing_app.extensions["carnet.mail"] = transport
    client = timing_app.test_client()
    token = csrf_from(client.get(url).get_data(as_text=True))
    for address in ("nobody.here@example.com", person.email):
        response = client.post(url, data={"csrf_token": token, "email": address})
        assert response.status_code == 200
        assert transport.sent == []           # nothing yet: the answer is not finished
        response.close()                       # what the WSGI server does once it is sent
    assert [m["To"] for m in transport.sent] == [person.email]
