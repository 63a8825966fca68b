"""Sliding-window rate limits: in memory by default, shared through Redis when
``CARNET_REDIS_URL`` is set (several app servers then count together)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Protocol

from flask import Flask, current_app

log = logging.getLogger("carnet.ratelimit")


class Backend(Protocol):
    def hit(self, key: str, limit: int, window: float) -> float: ...


class MemoryBackend:
    """Returns 0 when allowed, else the seconds to wait."""

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
                return max(0.0, hits[0] + window - now)
            hits.append(now)
            if len(self._hits) > 100_000:
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - window}
            return 0.0


class RedisBackend:
    """Shared limits. If Redis cannot be reached, counting falls back to this process's memory
    (logged) rather than failing the request: a log in must not break because of a cache."""

    def __init__(self, url: str) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=0.5,
                                                socket_connect_timeout=0.5)
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.fallback = MemoryBackend()

    def hit(self, key: str, limit: int, window: float) -> float:
        try:
            return self._hit(key, limit, window)
        except self.errors as exc:
            log.warning("rate limits: Redis unavailable (%s); counting in memory", exc)
            return self.fallback.hit(key, limit, window)

    def _hit(self, key: str, limit: int, window: float) -> float:
        now = time.time()
        name = f"carnet:rl:{key}"
        pipe = self.client.pipeline()
        pipe.zremrangebyscore(name, 0, now - window)
        pipe.zcard(name)
        pipe.zrange(name, 0, 0, withscores=True)
        _, count, oldest = pipe.execute()
        if count >= limit:
            return max(0.0, (oldest[0][1] + window - now) if oldest else window)
        pipe = self.client.pipeline()
        pipe.zadd(name, {f"{now}:{id(pipe)}": now})
        pipe.expire(name, math.ceil(window))
        pipe.execute()
        return 0.0


def parse(spec: str) -> tuple[int, float]:
    count, _, seconds = spec.partition("/")
    return int(count), float(seconds)


def init_app(app: Flask) -> None:
    url = app.config.get("REDIS_URL")
    app.extensions["carnet.ratelimit"] = RedisBackend(url) if url else MemoryBackend()


def hit(name: str, key: str) -> int:
    """Count one attempt against the ``<NAME>_RATE_LIMIT`` setting; 0 or seconds to wait."""
    limit, window = parse(current_app.config[f"{name.upper()}_RATE_LIMIT"])
    backend: Backend = current_app.extensions["carnet.ratelimit"]
    return math.ceil(backend.hit(f"{name}:{key}", limit, window))
