"""A real local HTTP server receiving webhooks: it verifies signatures, records what it got
in arrival order, and can be told to fail, redirect, stall or go down (and come back on the
same port)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """The receiver side of ``Carnet-Signature: t=<unix>,v1=<hex>`` (as in docs/api.md)."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    if "t" not in parts or "v1" not in parts or not parts["t"].isdigit():
        return False
    if abs(time.time() - int(parts["t"])) > tolerance:
        return False
    expected = hmac.new(
        secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


class WebhookReceiver:
    def __init__(self) -> None:
        self.secret = ""
        self.received: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.attempts = 0
        self.failures: list[int] = []  # statuses to answer next, one per request
        self.stalls = 0  # requests to hold (after recording them) until release()
        self.stalled = threading.Event()  # set while a request is being held
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._lock:
            self.failures.extend([status] * count)

    def stall_next(self, count: int = 1) -> None:
        """Record the next ``count`` deliveries but hold the answer until :meth:`release`
        (or 60 s): the sender sees a receiver that hangs, and times out or is killed."""
        with self._lock:
            self.stalls += count
            self._release.clear()
            self.stalled.clear()

    def release(self) -> None:
        self._release.set()

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.attempts += 1
                    status = receiver.failures.pop(0) if receiver.failures else None
                if status is not None:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                    self.end_headers()
                    return
                if not verify(receiver.secret, body, self.headers.get("Carnet-Signature", "")):
                    receiver.rejected.append(self.headers.get("Carnet-Signature", ""))
                    self.send_response(400)
                    self.end_headers()
                    return
                event = json.loads(body)
                assert self.headers["Carnet-Event-Id"] == event["id"]
                with receiver._lock:
                    receiver.received.append(event)
                    stall = receiver.stalls > 0
                    receiver.stalls -= stall
                if stall:
                    receiver.stalled.set()
                    receiver._release.wait(60)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: nothing listens on the port any more (connection refused)."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
