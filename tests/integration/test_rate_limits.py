"""Rate limits counted where every server process sees them: Redis (one atomic script) and,
without Redis outside development, the database (one atomic upsert). Several processes are
stood for by several backends or apps, each with its own connections; concurrency by threads
started together. Every test uses its own key prefix and removes what it wrote."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import Engine, delete, select

from portal import create_app
from portal.core.db import make_engine
from portal.core.ratelimit import DatabaseBackend, MemoryBackend, RedisBackend
from portal.core.ratelimit_counters import RateLimitCounter
from tests.conftest import app_config, csrf_from

REDIS_URL = "redis://127.0.0.1:6379/15"
THREADS = 20
LIMIT = 5


def redis_client() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({exc})")
    return client


@pytest.fixture
def prefix() -> str:
    return f"carnet-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_keys(prefix: str) -> Iterator[Any]:
    client = redis_client()
    yield client
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def url_of(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture
def counters(engine: Engine, prefix: str) -> Iterator[Callable[[], list[str]]]:
    """The keys of the counters this test wrote (committed: the apps below use their own
    connections, as separate processes would); removed afterwards."""
    def keys() -> list[str]:
        with engine.connect() as conn:
            return list(conn.scalars(select(RateLimitCounter.key).where(
                RateLimitCounter.key.startswith(prefix))))
    yield keys
    with engine.begin() as conn:
        conn.execute(delete(RateLimitCounter).where(RateLimitCounter.key.startswith(prefix)))


class Refuses:
    """A fallback that must never be used: the test is about the primary store."""

    name = "nothing"

    def hit(self, key: str, limit: int, window: float) -> float:
        raise AssertionError("the fallback counted")


def all_at_once(hits: list[Callable[[], float]]) -> list[float]:
    """Run every ``hit`` in its own thread, released together; their answers."""
    start = threading.Barrier(len(hits))
    answers: list[float] = [-1.0] * len(hits)

    def run(i: int) -> None:
        start.wait()
        answers[i] = hits[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(hits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_redis_allows_exactly_the_limit_to_concurrent_requests(redis_keys, prefix):
    """20 requests at once from 4 server processes, a limit of 5: exactly 5 pass (checking and
    adding in two round trips let several more through)."""
    workers = [RedisBackend(REDIS_URL, Refuses()) for _ in range(4)]
    key = f"{prefix}login:concurrent"
    answers = all_at_once([lambda i=i: workers[i % 4].hit(key, LIMIT, 60)
                           for i in range(THREADS)])
    assert answers.count(0.0) == LIMIT
    assert all(0 < wait <= 60 for wait in answers if wait)
    assert redis_keys.zcard(key) == LIMIT       # refused attempts are not counted
    assert 0 < redis_keys.pttl(key) <= 60_000   # and the key goes away by itself


def test_database_allows_exactly_the_limit_to_concurrent_requests(url_of, counters, prefix):
    """The same from 4 processes, each with its own engine on one database."""
    engines = [make_engine(url_of) for _ in range(4)]
    try:
        workers = [DatabaseBackend(e) for e in engines]
        key = f"{prefix}login:concurrent"
        answers = all_at_once([lambda i=i: workers[i % 4].hit(key, LIMIT, 60)
                               for i in range(THREADS)])
        assert answers.count(0.0) == LIMIT
        assert all(0 < wait <= 120 for wait in answers if wait)
        # Another key has its own budget.
        assert workers[0].hit(f"{prefix}login:other", LIMIT, 60) == 0.0
    finally:
        for engine in engines:
            engine.dispose()
    assert sorted(counters()) == [f"{prefix}login:concurrent", f"{prefix}login:other"]


def test_database_counters_that_can_no_longer_count_are_pruned(engine, counters, prefix):
    backend = DatabaseBackend(engine)
    assert backend.hit(f"{prefix}fresh", LIMIT, 60) == 0.0
    with engine.begin() as conn:
        conn.execute(RateLimitCounter.__table__.insert().values(
            key=f"{prefix}stale", bucket=1, hits=3,
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert sorted(counters()) == [f"{prefix}fresh", f"{prefix}stale"]
    assert backend.prune() >= 1
    assert counters() == [f"{prefix}fresh"]


@pytest.fixture
def production_app(url_of: str, tmp_path: Path, prefix: str
                   ) -> Iterator[Callable[..., Flask]]:
    """Apps configured as on a server (each its own engine, as each process has)."""
    made: list[Flask] = []

    def make(name: str, **overrides: Any) -> Flask:
        config = app_config(tmp_path / name, ENV="production", TESTING=False,
                            SECRET_KEY="a-real-production-secret-0123456789",
                            SMTP_URL="smtp://127.0.0.1:9", DATABASE_URL=url_of,
                            RATE_LIMIT_KEY_PREFIX=prefix, LOGIN_RATE_LIMIT="3/300")
        app = create_app({**config, **overrides})
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["carnet.db"]["bind"].dispose()


def log_in(app: Flask, email: str, ip: str = "198.51.100.20") -> int:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = ip
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"csrf_token": token, "email": email,
                                       "password": "wrong password"}).status_code


def test_server_processes_share_the_count_in_the_database(production_app, counters,
                                                          monkeypatch):
    """Without Redis, two server processes count log in attempts together: 3 allowed in
    all, not 3 each. Nothing there connects to Redis, and no counter names the address."""
    monkeypatch.delenv("CARNET_REDIS_URL", raising=False)
    first, second = production_app("a"), production_app("b")
    backend = first.extensions["carnet.ratelimit"].backend
    assert not isinstance(backend, RedisBackend | MemoryBackend)
    assert [log_in(first, "lea@example.com"), log_in(second, "lea@example.com"),
            log_in(first, "lea@example.com")] == [401, 401, 401]
    assert log_in(second, "lea@example.com") == 429
    assert log_in(first, "lea@example.com") == 429
    assert log_in(second, "max@example.com") == 401
    keys = counters()
    assert keys and not [k for k in keys if "lea" in k or "198.51" in k or "example" in k]


def test_with_redis_down_a_server_counts_in_the_database(production_app, counters, caplog):
    """Redis unreachable outside development: the limits still hold across processes
    (counted in the database, not in each process's memory), logged without the key."""
    down = "redis://127.0.0.1:1/0"   # nothing listens on port 1
    first, second = production_app("a", REDIS_URL=down), production_app("b", REDIS_URL=down)
    assert isinstance(first.extensions["carnet.ratelimit"].backend, RedisBackend)
    caplog.set_level("INFO", logger="carnet.ratelimit")
    assert [log_in(first, "lea@example.com"), log_in(second, "lea@example.com"),
            log_in(first, "lea@example.com")] == [401, 401, 401]
    assert log_in(second, "lea@example.com") == 429
    assert counters()
    warnings = [r.getMessage() for r in caplog.records if r.name == "carnet.ratelimit"]
    assert warnings and all("Redis unavailable" in w and "database" in w for w in warnings)
    assert not [w for w in warnings if "lea" in w or "198.51" in w or "login" in w]


def test_server_processes_share_the_count_in_redis(production_app, redis_keys, prefix,
                                                   counters):
    first = production_app("a", REDIS_URL=REDIS_URL)
    second = production_app("b", REDIS_URL=REDIS_URL)
    assert [log_in(first, "lea@example.com"), log_in(second, "lea@example.com"),
            log_in(first, "lea@example.com")] == [401, 401, 401]
    assert log_in(second, "lea@example.com") == 429
    assert counters() == []   # Redis counted; the database was not touched
    keys = [k.decode() for k in redis_keys.scan_iter(match=f"{prefix}*")]
    assert len(keys) == 2     # (address, IP) and address
    assert not [k for k in keys if "lea" in k or "198.51" in k]


def test_development_counts_in_memory_unless_told_otherwise(tmp_path, connection):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection))
    assert isinstance(app.extensions["carnet.ratelimit"].backend, MemoryBackend)
    with pytest.raises(RuntimeError, match="RATE_LIMIT_STORAGE"):
        create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                              RATE_LIMIT_STORAGE="redis"))   # no REDIS_URL


def test_the_database_store_inside_a_request_transaction(connection, tmp_path, session):
    """Bound to one connection (as the test suite binds apps), the counters are written in
    savepoints of it, and the request's own transaction is left alone."""
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                RATE_LIMIT_STORAGE="database", LOGIN_RATE_LIMIT="2/300"))
    assert [log_in(app, "lea@example.com") for _ in range(3)] == [401, 401, 429]
    assert session.scalar(select(RateLimitCounter.hits).where(
        RateLimitCounter.key.startswith("carnet:rl:login:"))) == 2
