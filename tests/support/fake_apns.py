"""A real HTTP/2 server standing in for APNs, for tests that must see the bytes on the wire.

It speaks HTTP/2 over TLS (ALPN ``h2``) exactly as the production gateway does, so the
client under test runs its normal code path: TLS handshake and certificate verification
(against a throwaway CA written at start-up; pass :attr:`FakeAPNs.ca_file` to the client),
protocol negotiation, one connection multiplexing many streams.  Cleartext h2c would have
needed a client switch that production never uses.

Every request is recorded (path, headers, body, which connection carried it).  Like Apple,
the server checks the bearer JWT signature with the APNs public key, the ``kid``/``iss``
claims and the ``apns-topic``, and answers per device token as the test scripts it.
"""

from __future__ import annotations

import base64
import json
import selectors
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.support.tls import make_tls_material


@dataclass(frozen=True)
class Reply:
    """A scripted answer: status, APNs ``reason`` and extra headers; ``stall`` never answers."""

    status: int = 200
    reason: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stall: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    connection: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    jwt_header: dict[str, Any] | None
    jwt_claims: dict[str, Any] | None
    status: int | None  # what was answered (None while stalled)

    @property
    def device_token(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))




class FakeAPNs:
    """APNs on ``https://127.0.0.1:<random port>``, run in background threads.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        *,
        directory: Path,
        team_id: str,
        key_id: str,
        public_key: ec.EllipticCurvePublicKey,
        topic: str,
    ) -> None:
        self.team_id, self.key_id, self.topic = team_id, key_id, topic
        self._public_key = public_key
        material = make_tls_material(directory, "Fake APNs")
        self.ca_file, cert_file, key_file = material.ca_path, material.cert_path, material.key_path
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls.load_cert_chain(cert_file, key_file)
        self._tls.set_alpn_protocols(["h2"])
        self._lock = threading.Lock()
        self._script: dict[str, deque[Reply]] = {}
        self._requests: list[RecordedRequest] = []
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self.port = 0

    # -- test-facing API ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return len(self._connections)

    def script(self, token: str, *replies: Reply | int) -> None:
        """Answer the next pushes to ``token`` with ``replies`` in order; the last one sticks."""
        queue = deque(r if isinstance(r, Reply) else Reply(status=r) for r in replies)
        with self._lock:
            self._script[token] = queue

    def start(self) -> FakeAPNs:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name="fake-apns-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake_w.send(b"x")
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)
        for conn in connections:
            conn.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FakeAPNs:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- server internals --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    raw, _addr = self._listener.accept()
                    raw.setblocking(True)
                    with self._lock:
                        number = len(self._connections)
                        self._connections.append(raw)
                    thread = threading.Thread(
                        target=self._serve,
                        args=(raw, number),
                        name=f"fake-apns-{number}",
                        daemon=True,
                    )
                    with self._lock:
                        self._threads.append(thread)
                    thread.start()

    def _serve(self, raw: socket.socket, number: int) -> None:
        try:
            sock = self._tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            return
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            return
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        try:
            while not self._stopping.is_set():
                data = sock.recv(65535)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = {str(k): str(v) for k, v in event.headers or []}
                        streams[event.stream_id] = (headers, bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id][1].extend(event.data or b"")
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        headers, body = streams.pop(event.stream_id)
                        self._answer(conn, event.stream_id, headers, bytes(body), number)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _check_jwt(
        self, authorization: str | None
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
        """Return (header, claims, error reason) for an ``authorization`` header."""
        if not authorization or not authorization.startswith("bearer "):
            return None, None, "MissingProviderToken"
        try:
            head, body, signature = authorization[len("bearer ") :].split(".")
            header = json.loads(_b64url_decode(head))
            claims = json.loads(_b64url_decode(body))
            raw = _b64url_decode(signature)
        except ValueError:
            return None, None, "InvalidProviderToken"
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id or len(raw) != 64:
            return header, claims, "InvalidProviderToken"
        try:
            self._public_key.verify(
                encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:])),
                f"{head}.{body}".encode("ascii"),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            return header, claims, "InvalidProviderToken"
        if claims.get("iss") != self.team_id or not isinstance(claims.get("iat"), int):
            return header, claims, "InvalidProviderToken"
        if claims["iat"] < time.time() - 3600:
            return header, claims, "ExpiredProviderToken"
        return header, claims, None

    def _decide(
        self, headers: dict[str, str], body: bytes, token: str, jwt_error: str | None
    ) -> Reply:
        if jwt_error is not None:
            return Reply(403, jwt_error)
        if headers.get(":method") != "POST":
            return Reply(405, "MethodNotAllowed")
        if not headers.get(":path", "").startswith("/3/device/"):
            return Reply(404, "BadPath")
        if headers.get("apns-topic") != self.topic:
            return Reply(400, "TopicDisallowed" if headers.get("apns-topic") else "MissingTopic")
        try:
            payload = json.loads(body)
        except ValueError:
            return Reply(400, "PayloadEmpty" if not body else "BadPayload")
        if not isinstance(payload, dict) or "aps" not in payload:
            return Reply(400, "BadPayload")
        with self._lock:
            queue = self._script.get(token)
            if queue:
                return queue.popleft() if len(queue) > 1 else queue[0]
        return Reply(200)

    def _answer(
        self,
        conn: h2.connection.H2Connection,
        stream_id: int,
        headers: dict[str, str],
        body: bytes,
        number: int,
    ) -> None:
        path = headers.get(":path", "")
        token = path.rsplit("/", 1)[-1]
        jwt_header, jwt_claims, jwt_error = self._check_jwt(headers.get("authorization"))
        reply = self._decide(headers, body, token, jwt_error)
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    connection=number,
                    method=headers.get(":method", ""),
                    path=path,
                    headers=headers,
                    body=body,
                    jwt_header=jwt_header,
                    jwt_claims=jwt_claims,
                    status=None if reply.stall else reply.status,
                )
            )
        if reply.stall:
            return
        response_headers = [(":status", str(reply.status)), ("apns-id", str(uuid.uuid4()))]
        response_headers += [(k.lower(), v) for k, v in reply.headers.items()]
        if reply.status == 200:
            conn.send_headers(stream_id, response_headers, end_stream=True)
            return
        document: dict[str, Any] = {"reason": reply.reason or "Unknown"}
        if reply.status == 410:
            document["timestamp"] = int(time.time() * 1000)
        payload = json.dumps(document).encode()
        response_headers += [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
        ]
        conn.send_headers(stream_id, response_headers)
        conn.send_data(stream_id, payload, end_stream=True)
