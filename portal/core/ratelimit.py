"""Sliding-window rate limits, counted where every app process sees the same count.

Where (``CARNET_RATE_LIMIT_STORAGE``, see :func:`make_backend`):

- **Redis** when ``CARNET_REDIS_URL`` is set: one Lua script removes the expired attempts,
  counts and adds, atomically, so concurrent requests cannot overshoot.
- **the database** otherwise, outside development: a counter per key and fixed window,
  incremented by one atomic upsert that refuses beyond the limit; the previous window's count
  weighs in by the part of it still inside the sliding window (an approximation that assumes
  its attempts were spread evenly).
- **this process's memory** in development and tests: four server processes would each
  allow the full limit, which is why nothing else uses it unless told to.

Keys are HMAC digests of what is counted (an address, an IP, a key id), keyed by the app's
secret: no store holds an address or an IP in clear. If Redis cannot be reached, counting
falls back to the database (memory in development) for a few seconds at a time, and the log
says so without the key: a log in must not break because of a cache.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from flask import Flask, current_app
from sqlalchemy import Engine, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from portal.core.db import WRITE_OPTION, get_engine
from portal.core.ratelimit_counters import RateLimitCounter

log = logging.getLogger("carnet.ratelimit")
EXTENSION = "carnet.ratelimit"


class Backend(Protocol):
    def hit(self, key: str, limit: int, window: float) -> float:
        """Count one attempt if allowed: 0.0, else the seconds to wait (nothing counted)."""
        ...


class MemoryBackend:
    """This process only."""

    name = "memory"

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, limit: int, window: float) -> float:
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - window:
                hits.popleft()
            if len(hits) >= limit:
                return max(0.001, hits[0] + window - now)
            hits.append(now)
            if len(self._hits) > 100_000:
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - window}
            return 0.0


class DatabaseBackend:
    """Counters in ``rate_limit_counters``, shared by every process using the database."""

    name = "the database"
    PRUNE_EVERY = 60.0  # seconds between two deletions of expired counters, per process

    def __init__(self, bind: Engine | Connection) -> None:
        self.bind = bind
        self.insert = postgresql.insert if bind.dialect.name == "postgresql" else sqlite.insert
        self._next_prune = 0.0

    def hit(self, key: str, limit: int, window: float) -> float:
        now = time.time()
        bucket = int(now // window)
        into = (now - bucket * window) / window
        table = RateLimitCounter
        with self._connection() as conn:
            previous = conn.execute(select(table.hits).where(
                table.key == key, table.bucket == bucket - 1)).scalar() or 0
            budget = limit - previous * (1.0 - into)
            if budget >= 1:
                expires = datetime.fromtimestamp((bucket + 2) * window, UTC)
                upsert = self.insert(table).values(
                    key=key, bucket=bucket, hits=1, expires_at=expires
                ).on_conflict_do_update(
                    index_elements=[table.key, table.bucket],
                    set_={"hits": table.hits + 1},
                    where=table.hits + 1 <= budget,   # checked on the locked, latest row
                )
                if conn.execute(upsert.returning(table.hits)).first() is not None:
                    self._prune_now_and_then(conn, now)
                    return 0.0
            current = conn.execute(select(table.hits).where(
                table.key == key, table.bucket == bucket)).scalar() or 0
        return _sliding_wait(now, window, bucket, previous, current, limit)

    def prune(self, conn: Connection | None = None) -> int:
        """Delete the counters that can no longer count; how many."""
        if conn is None:
            with self._connection() as own:
                return self.prune(own)
        result = conn.execute(delete(RateLimitCounter).where(
            RateLimitCounter.expires_at < datetime.now(UTC)))
        return int(getattr(result, "rowcount", 0) or 0)

    def _prune_now_and_then(self, conn: Connection, now: float) -> None:
        if now >= self._next_prune:
            self._next_prune = now + self.PRUNE_EVERY
            self.prune(conn)

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """Its own short transaction, committed at once whatever the request does next.
        PostgreSQL: autocommit (each statement is atomic on its own). SQLite: ``BEGIN
        IMMEDIATE``, writers take turns. Bound to a test's connection: a savepoint in it."""
        if isinstance(self.bind, Connection):
            with self.bind.begin_nested():
                yield self.bind
            return
        with self.bind.connect() as conn:
            if self.bind.dialect.name == "postgresql":
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
                return
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn


def _sliding_wait(now: float, window: float, bucket: int, previous: int, current: int,
                  limit: int) -> float:
    """Seconds until ``current + 1`` attempts plus the previous window's weighted count fit
    in ``limit`` again."""
    start = bucket * window
    room = limit - current - 1
    if previous > 0 and room >= 0:  # later in this window, as the previous one weighs less
        return max(0.001, start + (1.0 - room / previous) * window - now)
    # In the next window, where this one is the previous.
    fraction = max(0.0, 1.0 - (limit - 1) / current) if current > 0 else 0.0
    return max(0.001, start + window + fraction * window - now)


# KEYS[1]: the sorted set of one key's attempts (scored by time). ARGV: window (s), limit,
# a unique member. Redis's own clock: app servers whose clocks differ still agree.
SLIDING_WINDOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] == nil then return tostring(window) end
  return tostring(tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return '0'
"""


class RedisBackend:
    """One atomic script per attempt. Unreachable Redis: ``fallback`` counts for the next
    :attr:`RETRY_AFTER` seconds (a Redis that hangs would otherwise cost every request its
    timeout), then Redis is tried again."""

    name = "Redis"
    RETRY_AFTER = 5.0

    def __init__(self, url: str, fallback: Backend) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=0.5,
                                                socket_connect_timeout=0.5)
        self.script: Any = self.client.register_script(SLIDING_WINDOW)
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.fallback = fallback
        self._down_until = 0.0

    def hit(self, key: str, limit: int, window: float) -> float:
        if time.monotonic() < self._down_until:
            return self.fallback.hit(key, limit, window)
        try:
            answer = self.script(keys=[key], args=[window, limit, uuid.uuid4().hex])
        except self.errors as exc:
            self._down_until = time.monotonic() + self.RETRY_AFTER
            log.warning("rate limits: Redis unavailable (%s); counting in %s for %d s",
                        type(exc).__name__, getattr(self.fallback, "name", "fallback"),
                        self.RETRY_AFTER)
            return self.fallback.hit(key, limit, window)
        wait = float(answer.decode() if isinstance(answer, bytes) else answer)
        return max(0.001, wait) if wait > 0 else 0.0


class _FailSafe:
    """The database as a store: if it fails, this process's memory counts (logged), as the
    request itself will likely fail anyway and must not fail here first."""

    def __init__(self, backend: DatabaseBackend) -> None:
        self.backend = backend
        self.memory = MemoryBackend()
        self.name = backend.name

    def hit(self, key: str, limit: int, window: float) -> float:
        try:
            return self.backend.hit(key, limit, window)
        except SQLAlchemyError as exc:
            log.warning("rate limits: the database is unavailable (%s); counting in memory",
                        type(exc).__name__)
            return self.memory.hit(key, limit, window)


@dataclass(frozen=True)
class Limits:
    backend: Backend
    secret: bytes
    prefix: str

    def key(self, name: str, value: str) -> str:
        digest = hmac.new(self.secret, f"{name}\x00{value}".encode(), hashlib.sha256)
        return f"{self.prefix}{name}:{digest.hexdigest()[:32]}"


def parse(spec: str) -> tuple[int, float]:
    count, _, seconds = spec.partition("/")
    return int(count), float(seconds)


def make_backend(app: Flask) -> Backend:
    """The store ``CARNET_RATE_LIMIT_STORAGE`` names; by default Redis when
    ``CARNET_REDIS_URL`` is set, else memory in development and the database otherwise.
    Without ``CARNET_REDIS_URL`` nothing connects to Redis."""
    development = app.config["ENV"] == "development"
    url = app.config.get("REDIS_URL")
    storage = (app.config.get("RATE_LIMIT_STORAGE") or "").strip().lower()
    if not storage:
        storage = "redis" if url else ("memory" if development else "database")
    if storage == "memory":
        return MemoryBackend()
    if storage == "database":
        return _FailSafe(DatabaseBackend(get_engine(app)))
    if storage == "redis" and url:
        fallback: Backend = (MemoryBackend() if development
                             else _FailSafe(DatabaseBackend(get_engine(app))))
        return RedisBackend(url, fallback)
    raise RuntimeError(f"CARNET_RATE_LIMIT_STORAGE={storage!r}: use redis (with "
                       "CARNET_REDIS_URL), database or memory")


def init_app(app: Flask) -> None:
    secret = hmac.new(str(app.config["SECRET_KEY"]).encode(), b"carnet rate-limit keys",
                      hashlib.sha256).digest()
    app.extensions[EXTENSION] = Limits(make_backend(app), secret,
                                       app.config.get("RATE_LIMIT_KEY_PREFIX") or "")


def hit(name: str, key: str) -> int:
    """Count one attempt against the ``<NAME>_RATE_LIMIT`` setting; 0 or seconds to wait."""
    count, window = parse(current_app.config[f"{name.upper()}_RATE_LIMIT"])
    limits: Limits = current_app.extensions[EXTENSION]
    return math.ceil(limits.backend.hit(limits.key(name, key), count, window))
