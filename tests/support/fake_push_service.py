"""A local push service (RFC 8030) that checks what real ones check, and decrypts.

It is a real HTTP/1.1 server on 127.0.0.1 with keep-alive, optionally over TLS with a
throw-away certificate authority, so that clients (Carnet's sender, Node's ``web-push``)
talk to it exactly as they would to FCM or Mozilla's autopush. Each request is verified
(VAPID RFC 8292 JWT signature, ``aud``, ``exp``, ``sub``; ``TTL``; ``Urgency``; ``Topic``;
``Content-Encoding: aes128gcm``), then decrypted with ``http_ece`` using the subscription's
private key, and recorded with the id of the TCP connection it came on so connection reuse
can be counted. Answers can be scripted per endpoint (404, 410, 413, 429, 500, a stall...).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.support.tls import TlsMaterial, make_tls_material

MAX_BODY = 4096
MAX_VAPID_LIFETIME = 24 * 3600
URGENCIES = {"very-low", "low", "normal", "high"}
STALL_LIMIT_SECONDS = 30.0


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    text = text.strip().rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True)
class FakeSubscriptionKeys:
    """What a browser keeps secret: needed by the fake service to decrypt."""

    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes
    #: When set, the subscription was made with this applicationServerKey and messages
    #: signed with another key are refused with 403, as real push services do.
    application_server_key: str | None = None


def make_fake_subscription(
    base_url: str, *, path: str | None = None, application_server_key: str | None = None
) -> tuple[dict[str, Any], FakeSubscriptionKeys]:
    """A subscription shaped like ``PushSubscription.toJSON()`` with real key material."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    public = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    auth = os.urandom(16)
    path = path or "/push/" + _b64e(os.urandom(12))
    subscription = {
        "endpoint": base_url.rstrip("/") + path,
        "expirationTime": None,
        "keys": {"p256dh": _b64e(public), "auth": _b64e(auth)},
    }
    return subscription, FakeSubscriptionKeys(private_key, auth, application_server_key)


# --------------------------------------------------------------------------- records & answers


@dataclass(frozen=True)
class Answer:
    """A scripted reply. ``stall`` holds the reply until the service stops (or the limit)."""

    status: int = 201
    headers: Mapping[str, str] = field(default_factory=dict)
    stall: bool = False


@dataclass(frozen=True)
class Received:
    """One request as the push service saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    plaintext: bytes | None
    connection_id: int
    status: int
    reason: str
    claims: dict[str, Any] | None = None


class _Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --------------------------------------------------------------------------- TLS material




# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    service: FakePushService

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up or refusing our certificate are expected here; stay quiet."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection_id = self.server.service._connection_opened()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def do_POST(self) -> None:
        self.server.service._handle(self)

    def do_GET(self) -> None:
        self._reply(405, {}, b"")

    def _reply(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"Content-Length: {len(body)}", "", ""]
        try:
            # One write: headers and body leave together (no Nagle/delayed-ACK stall).
            self.wfile.write("\r\n".join(lines).encode("latin-1") + body)
        except OSError:
            self.close_connection = True


class FakePushService:
    """Start with ``start()`` (or as a context manager), ``stop()`` when done.

    ``verify=False`` skips VAPID checks and decryption (headers are still recorded); it
    exists to measure a client without the service's own cost, and is off by default.

    ``name`` makes the service present itself under a DNS name instead of 127.0.0.1: its
    endpoints and the VAPID ``aud`` it expects use the name, and its certificate (TLS mode)
    covers it. Clients reach it through a resolver that maps the name to 127.0.0.1.
    """

    def __init__(self, *, tls: bool = False, verify: bool = True,
                 name: str | None = None) -> None:
        self.tls = tls
        self.verify = verify
        self.name = name
        self._lock = threading.Lock()
        self._subscriptions: dict[str, FakeSubscriptionKeys] = {}
        self._scripts: dict[str, list[Answer]] = {}
        self._records: list[Received] = []
        self._connections = 0
        self._release = threading.Event()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._tls_material: TlsMaterial | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.stalled = threading.Event()  # set when a stalled answer is being held

    # -- lifecycle

    def start(self) -> FakePushService:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.service = self
        if self.tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="fake-push-")
            self._tls_material = make_tls_material(
                Path(self._tmp.name), "Fake push service", (self.name,) if self.name else ())
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self._tls_material.cert_path, self._tls_material.key_path)
            # Handshake in the per-connection thread, not in the accept loop.
            server.socket = context.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
        self._server = self._thread = self._tmp = None

    def __enter__(self) -> FakePushService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- configuration

    @property
    def origin(self) -> str:
        assert self._server is not None, "start() first"
        port = self._server.server_address[1]
        return f"{'https' if self.tls else 'http'}://{self.name or '127.0.0.1'}:{port}"

    base_url = origin

    @property
    def ca_path(self) -> str:
        """CA bundle that clients must trust (TLS mode only)."""
        assert self._tls_material is not None, "TLS is off"
        return str(self._tls_material.ca_path)

    def register(self, subscription: Mapping[str, Any], keys: FakeSubscriptionKeys) -> None:
        path = "/" + str(subscription["endpoint"]).split("/", 3)[3]
        with self._lock:
            self._subscriptions[path] = keys

    def new_subscription(self, *, application_server_key: str | None = None) -> dict[str, Any]:
        """Create and register a subscription; messages to it are accepted and decrypted."""
        subscription, keys = make_fake_subscription(
            self.origin, application_server_key=application_server_key
        )
        self.register(subscription, keys)
        return subscription

    def script(self, endpoint: str, *answers: Answer) -> None:
        """Answers for the next requests to ``endpoint``; the last one repeats."""
        path = "/" + endpoint.split("/", 3)[3] if "://" in endpoint else endpoint
        with self._lock:
            self._scripts[path] = list(answers)

    def release_stalled(self) -> None:
        """Answer every held request now (and later stalls at once)."""
        self._release.set()

    # -- observation

    @property
    def records(self) -> list[Received]:
        with self._lock:
            return list(self._records)

    @property
    def connections_opened(self) -> int:
        with self._lock:
            return self._connections

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()
            self._connections = 0

    def summary(self) -> dict[str, Any]:
        """Counts a benchmark can report without shipping every record between processes."""
        with self._lock:
            records = list(self._records)
            connections = self._connections
        return {
            "requests": len(records),
            "statuses": dict(Counter(r.status for r in records)),
            "reasons": dict(Counter(r.reason for r in records if r.status >= 300)),
            "connections_opened": connections,
            "connections_used": len({r.connection_id for r in records}),
            "plaintexts": sorted(r.plaintext or b"" for r in records if r.status < 300),
        }

    # -- request handling (server threads)

    def _connection_opened(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in handler.headers.items()}
        path = handler.path
        plaintext: bytes | None = None
        claims: dict[str, Any] | None = None
        with self._lock:
            keys = self._subscriptions.get(path)
            script = self._scripts.get(path)
            answer = (script.pop(0) if len(script) > 1 else script[0]) if script else Answer()
        try:
            if keys is None:
                raise _Rejected(404, "no such subscription")
            if self.verify:
                claims = self._check_vapid(headers.get("authorization"), keys)
            self._check_headers(headers, body)
            if self.verify and body:
                plaintext = self._decrypt(body, keys)
            elif not body:
                plaintext = b""
            status, reason = answer.status, "scripted" if script else "accepted"
        except _Rejected as rejected:
            status, reason, answer = rejected.status, rejected.reason, Answer(rejected.status)
        record = Received(
            path, headers, body, plaintext, handler.connection_id, status, reason, claims
        )
        with self._lock:
            self._records.append(record)
        if answer.stall:
            self.stalled.set()
            self._release.wait(STALL_LIMIT_SECONDS)
        reply_headers = dict(answer.headers)
        if status == 201:
            reply_headers.setdefault("Location", f"{self.origin}/message/{len(self._records)}")
        body_out = b"" if status < 300 else reason.encode("utf-8")
        handler._reply(status, reply_headers, body_out)

    def _check_vapid(self, authorization: str | None, keys: FakeSubscriptionKeys) -> dict[str, Any]:
        if not authorization or not authorization.lower().startswith("vapid "):
            raise _Rejected(401, "missing vapid authorization")
        params: dict[str, str] = {}
        for part in authorization[6:].split(","):
            name, _, value = part.strip().partition("=")
            params[name.strip().lower()] = value.strip()
        token, key_text = params.get("t"), params.get("k")
        if not token or not key_text:
            raise _Rejected(401, "vapid t= and k= are required")
        try:
            raw_key = _b64d(key_text)
            public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw_key)
            header_b64, claims_b64, signature_b64 = token.split(".")
            header = json.loads(_b64d(header_b64))
            claims = json.loads(_b64d(claims_b64))
            signature = _b64d(signature_b64)
        except ValueError as exc:
            raise _Rejected(401, f"malformed vapid token: {exc}") from exc
        if header.get("alg") != "ES256" or len(signature) != 64:
            raise _Rejected(401, "vapid token must be ES256")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            public_key.verify(
                der, f"{header_b64}.{claims_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature as exc:
            raise _Rejected(401, "vapid signature does not match k") from exc
        if claims.get("aud") != self.origin:
            raise _Rejected(401, f"vapid aud {claims.get('aud')!r} is not {self.origin}")
        exp = claims.get("exp")
        now = time.time()
        if not isinstance(exp, int) or not now < exp <= now + MAX_VAPID_LIFETIME:
            raise _Rejected(401, "vapid exp must be in the future and within 24 h")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(("mailto:", "https:")):
            raise _Rejected(401, "vapid sub must be mailto: or https:")
        if keys.application_server_key is not None and key_text.rstrip("=") != (
            keys.application_server_key.rstrip("=")
        ):
            raise _Rejected(403, "vapid key is not the subscription's applicationServerKey")
        return claims

    @staticmethod
    def _check_headers(headers: Mapping[str, str], body: bytes) -> None:
        ttl = headers.get("ttl")
        if ttl is None or not ttl.isdigit():
            raise _Rejected(400, "TTL header is required")
        urgency = headers.get("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _Rejected(400, f"bad Urgency {urgency!r}")
        topic = headers.get("topic")
        if topic is not None and (
            not 0 < len(topic) <= 32
            or any(not (c.isascii() and (c.isalnum() or c in "-_")) for c in topic)
        ):
            raise _Rejected(400, f"bad Topic {topic!r}")
        if len(body) > MAX_BODY:
            raise _Rejected(413, "payload too large")
        if body and headers.get("content-encoding") != "aes128gcm":
            raise _Rejected(400, "Content-Encoding must be aes128gcm")

    @staticmethod
    def _decrypt(body: bytes, keys: FakeSubscriptionKeys) -> bytes:
        try:
            return bytes(
                http_ece.decrypt(
                    body,
                    private_key=keys.private_key,
                    auth_secret=keys.auth_secret,
                    version="aes128gcm",
                )
            )
        except Exception as exc:  # http_ece raises several types on bad input
            raise _Rejected(400, f"cannot decrypt: {type(exc).__name__}") from exc
