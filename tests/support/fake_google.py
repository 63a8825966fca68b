"""A local Google (OAuth token endpoint + Wallet REST API) for tests, over real HTTP.

A threaded HTTP/1.1 server with keep-alive on 127.0.0.1 and a random port. The token
endpoint checks what Google checks in a JWT-bearer grant: the grant type, the assertion's
RS256 signature against the registered service account's public key, ``iss``, ``aud``,
``scope``, ``iat``/``exp``. The Wallet endpoints keep classes and objects in memory and
require an access token it issued. Every request is recorded (method, path, headers,
decoded body, TCP connection id) so tests can assert on what went over the wire, and
answers can be scripted (the next N Wallet calls fail with 503, 429 + Retry-After, or
stall until released).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.hazmat.primitives import serialization
from google.auth import jwt as google_jwt

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
WALLET_SCOPE = "https://www.googleapis.com/auth/wallet_object.issuer"
WALLET_PREFIX = "/walletobjects/v1"
TOKEN_PATH = "/token"
TOKEN_LIFETIME = 3600
STALL_LIMIT_SECONDS = 10.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    connection_id: int

    @property
    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None


@dataclass
class _ScriptedFailure:
    status: int
    retry_after: str | None = None
    message: str = "scripted failure"
    stall: bool = False
    raw: bytes | None = None  # answer these bytes as they are (not JSON)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[RecordedRequest] = field(default_factory=list)
    public_keys: dict[str, bytes] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    token_rejections: list[str] = field(default_factory=list)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: deque[_ScriptedFailure] = field(default_factory=deque)
    release: threading.Event = field(default_factory=threading.Event)
    next_connection: int = 0


_REASONS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _google_error(status: int, message: str, reason: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": reason}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, keep-alive requests would each
    # wait for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _Server
    # An idle keep-alive connection is dropped after this, so threads never pile up.
    timeout = 15

    def setup(self) -> None:
        super().setup()
        with self.server.state.lock:
            self.server.state.next_connection += 1
            self.connection_id = self.server.state.next_connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: the recorded requests are the log."""

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, raw: bytes) -> RecordedRequest:
        content_type = self.headers.get("Content-Type", "")
        body: Any = None
        if raw:
            if content_type.startswith("application/x-www-form-urlencoded"):
                body = {k: v[0] for k, v in parse_qs(raw.decode("utf-8")).items()}
            else:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
        record = RecordedRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            connection_id=self.connection_id,
        )
        with self.server.state.lock:
            self.server.state.requests.append(record)
        return record

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        record = self._record(self._read_body())
        if record.path == TOKEN_PATH and record.method == "POST":
            self._token(record)
        elif record.path.startswith(WALLET_PREFIX + "/"):
            self._wallet(record)
        else:
            self._send_json(404, _google_error(404, "no such endpoint", "NOT_FOUND"))

    # ------------------------------------------------------------------ OAuth

    def _token(self, record: RecordedRequest) -> None:
        state = self.server.state
        problem = _check_assertion(state, record.body)
        if problem:
            with state.lock:
                state.token_rejections.append(problem)
            self._send_json(400, {"error": "invalid_grant", "error_description": problem})
            return
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with state.lock:
            state.tokens[token] = time.time() + TOKEN_LIFETIME
        self._send_json(
            200, {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}
        )

    # ------------------------------------------------------------------ Wallet

    def _wallet(self, record: RecordedRequest) -> None:
        state = self.server.state
        with state.lock:
            failure = state.failures.popleft() if state.failures else None
            expiry = state.tokens.get(record.bearer or "")
        if failure is not None and failure.raw is not None:
            self.send_response(failure.status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(failure.raw)))
            self.end_headers()
            self.wfile.write(failure.raw)
            return
        if failure is not None:
            if failure.stall:
                state.release.wait(STALL_LIMIT_SECONDS)
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            self._send_json(
                failure.status,
                _google_error(failure.status, failure.message, _REASONS.get(failure.status, "")),
                headers,
            )
            return
        if expiry is None or expiry < time.time():
            self._send_json(
                401,
                _google_error(
                    401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"
                ),
            )
            return
        parts = [unquote(p) for p in record.path[len(WALLET_PREFIX) + 1 :].split("/")]
        collection = {"loyaltyClass": state.classes, "loyaltyObject": state.objects}.get(parts[0])
        if collection is None or len(parts) > 3:
            self._send_json(404, _google_error(404, "no such endpoint", "NOT_FOUND"))
            return
        status, payload = _wallet_answer(state, parts, collection, record)
        self._send_json(status, payload)


def _check_assertion(state: _State, form: Any) -> str | None:
    """Why Google would refuse this grant, or None."""
    if not isinstance(form, dict) or form.get("grant_type") != JWT_BEARER_GRANT:
        return "grant_type must be " + JWT_BEARER_GRANT
    assertion = form.get("assertion")
    if not assertion:
        return "assertion missing"
    try:
        unverified = google_jwt.decode(assertion, verify=False)
    except ValueError as exc:
        return f"assertion is not a JWT: {exc}"
    issuer = unverified.get("iss")
    with state.lock:
        public_key = state.public_keys.get(issuer)
    if public_key is None:
        return f"unknown service account {issuer!r}"
    try:
        claims = google_jwt.decode(assertion, certs=public_key, audience=GOOGLE_TOKEN_AUDIENCE)
    except ValueError as exc:
        return f"assertion rejected: {exc}"
    if WALLET_SCOPE not in str(claims.get("scope", "")).split():
        return f"scope {claims.get('scope')!r} does not include {WALLET_SCOPE}"
    return None


def _wallet_answer(
    state: _State,
    parts: list[str],
    collection: dict[str, dict[str, Any]],
    record: RecordedRequest,
) -> tuple[int, Any]:
    kind = parts[0]
    method = record.method
    with state.lock:
        if len(parts) == 1 and method == "POST":
            body = record.body
            if not isinstance(body, dict) or not body.get("id"):
                return 400, _google_error(400, "Invalid resource id", "INVALID_ARGUMENT")
            if body["id"] in collection:
                return 409, _google_error(
                    409, f"Resource already exists: {body['id']}", "ALREADY_EXISTS"
                )
            if kind == "loyaltyObject" and body.get("classId") not in state.classes:
                return 404, _google_error(
                    404, f"Class not found: {body.get('classId')}", "NOT_FOUND"
                )
            collection[body["id"]] = dict(body)
            return 200, collection[body["id"]]
        if len(parts) < 2:
            return 404, _google_error(404, "no such endpoint", "NOT_FOUND")
        resource = collection.get(parts[1])
        if resource is None:
            return 404, _google_error(404, f"Resource not found: {parts[1]}", "NOT_FOUND")
        if len(parts) == 2 and method == "GET":
            return 200, resource
        if len(parts) == 2 and method == "PATCH":
            if not isinstance(record.body, dict):
                return 400, _google_error(400, "Body must be a JSON object", "INVALID_ARGUMENT")
            resource.update({k: v for k, v in record.body.items() if k != "notifyPreference"})
            return 200, resource
        if len(parts) == 3 and parts[2] == "addMessage" and method == "POST":
            message = record.body.get("message") if isinstance(record.body, dict) else None
            if not isinstance(message, dict):
                return 400, _google_error(400, "message is required", "INVALID_ARGUMENT")
            resource.setdefault("messages", []).append(message)
            return 200, {"resource": resource}
        return 404, _google_error(404, "no such endpoint", "NOT_FOUND")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout test) closes its end: not worth a traceback."""


class FakeGoogle:
    """Start with ``with FakeGoogle() as google:``; point clients at its URLs."""

    def __init__(self) -> None:
        self.state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeGoogle:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.state = self.state
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},  # shutdown() waits for one poll
            name="fake-google",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.state.release.set()
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeGoogle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def origin(self) -> str:
        assert self._server is not None, "FakeGoogle is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_uri(self) -> str:
        return self.origin + TOKEN_PATH

    @property
    def base_url(self) -> str:
        return self.origin + WALLET_PREFIX

    # ------------------------------------------------------------------ set-up

    def trust_service_account(self, key_file: Path | str) -> dict[str, Any]:
        """Accept grants signed by this key file's private key; returns the file's data."""
        info: dict[str, Any] = json.loads(Path(key_file).read_text(encoding="utf-8"))
        private_key = serialization.load_pem_private_key(
            info["private_key"].encode("ascii"), password=None
        )
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with self.state.lock:
            self.state.public_keys[info["client_email"]] = public_pem
        return info

    def fail_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: str | None = None,
        message: str = "scripted failure",
    ) -> None:
        """The next ``count`` Wallet calls answer ``status`` (token calls are unaffected)."""
        with self.state.lock:
            for _ in range(count):
                self.state.failures.append(_ScriptedFailure(status, retry_after, message))

    def stall_next(self, count: int = 1) -> None:
        """The next ``count`` Wallet calls hang until :meth:`release_stalled` (then 503)."""
        with self.state.lock:
            self.state.release.clear()
            for _ in range(count):
                self.state.failures.append(_ScriptedFailure(503, stall=True))

    def garble_next(self, count: int = 1, body: bytes = b"<html>Gateway</html>") -> None:
        """The next ``count`` Wallet calls answer 200 with a body that is not JSON, as a
        misbehaving proxy on the way might."""
        with self.state.lock:
            for _ in range(count):
                self.state.failures.append(_ScriptedFailure(200, raw=body))

    def release_stalled(self) -> None:
        self.state.release.set()

    def revoke_tokens(self) -> None:
        """Forget every issued access token, as if they had all expired at Google."""
        with self.state.lock:
            self.state.tokens.clear()

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == TOKEN_PATH]

    @property
    def wallet_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(WALLET_PREFIX)]

    @property
    def token_rejections(self) -> list[str]:
        with self.state.lock:
            return list(self.state.token_rejections)

    @property
    def issued_tokens(self) -> set[str]:
        with self.state.lock:
            return set(self.state.tokens)

    @property
    def classes(self) -> dict[str, dict[str, Any]]:
        with self.state.lock:
            return {k: dict(v) for k, v in self.state.classes.items()}

    @property
    def objects(self) -> dict[str, dict[str, Any]]:
        with self.state.lock:
            return {k: dict(v) for k, v in self.state.objects.items()}
