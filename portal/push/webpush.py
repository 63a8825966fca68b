"""Web push sending: RFC 8030 delivery, RFC 8291 encryption, RFC 8292 VAPID.

This module knows nothing of Flask or the database. It takes a subscription as the browser
gives it (``PushSubscription.toJSON()``), bytes to deliver, and answers with a
:class:`PushOutcome` that tells the caller what to do with the subscription: keep it,
deactivate it, retry later, or fix our own configuration.

Why not ``pywebpush.webpush()``: it has no timeout by default, sends ``TTL: 0`` unless told
otherwise, mutates the claims dict it is given (so ``aud`` sticks to the first push service
it saw), does not cap the payload size and raises on every non-2xx answer. Its ``WebPusher``
accepts a ``requests.Session`` but copies the subscription and re-parses it on every call and
signs through ``py_vapid`` (about twice the cost of signing directly). Encryption is the
well-reviewed ``http_ece`` implementation; the VAPID JWT is a few lines of ``cryptography``.

The HTTP request goes through one ``urllib3.PoolManager`` so that a fan-out to thousands of
subscriptions on the same push service reuses a handful of keep-alive TLS connections.
``requests`` (which wraps the same urllib3 pool) was measured at about 0.5 ms of CPU per
POST against 0.3 ms for urllib3 directly, more than the encryption itself; since a push
request needs none of what ``requests`` adds (cookies, redirects, auth, proxies from the
environment), the pool is used directly.

Endpoints come from browsers, that is from anyone, so every send applies the destination rule
(:mod:`portal.core.outbound`): the endpoint's name is resolved, every address checked, and the
request goes to the checked address through a pool keyed by that address and the name, with
``server_hostname``/``assert_hostname`` set to the name so that TLS still sends and verifies
it, and a ``Host`` header naming it. A name that turns private between subscription and
sending is refused (``refused_destination``), and the request never leaves. Redirects are
never followed. Network errors are summed up by kind in the outcome's ``detail``, without
their text (which would carry addresses and ports), so a stored delivery never reads as a
port scan.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import certifi
import http_ece
import urllib3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from portal.core.outbound import Pinned, RefusedDestination, Resolver, check_url, pin
from portal.push.vapid import (  # noqa: F401  (re-exported)
    VapidKeyError,
    VapidKeys,
    VapidSubjectError,
    WebPushError,
    _b64url_decode,
    _b64url_encode,
    _check_subject,
    generate_vapid_keys,
    load_vapid_private_key,
    save_vapid_private_key,
)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MAX_TTL_SECONDS",
    "URGENCIES",
    "VAPID_TOKEN_LIFETIME_SECONDS",
    "InvalidPushOptions",
    "InvalidSubscription",
    "PayloadTooLarge",
    "PushOutcome",
    "PushSubscription",
    "VapidKeyError",
    "VapidKeys",
    "VapidSubjectError",
    "WebPushError",
    "WebPushSender",
    "generate_vapid_keys",
    "load_vapid_private_key",
    "make_push_pool",
    "parse_retry_after",
    "parse_subscription",
    "save_vapid_private_key",
]

#: RFC 8291 §4: one 4096-byte record minus the 86-byte header, the padding delimiter and the
#: 16-byte tag. Push services are only required to accept this much.
MAX_PAYLOAD_BYTES = 3993
#: RFC 8292 allows 24 h; some push services reject more than 12 h, so never go above that.
VAPID_TOKEN_LIFETIME_SECONDS = 12 * 3600
#: Push services clamp TTL to about four weeks; a larger value is almost always a unit
#: mistake (milliseconds for seconds), so it is refused rather than silently clamped.
MAX_TTL_SECONDS = 28 * 24 * 3600
URGENCIES = ("very-low", "low", "normal", "high")
DEFAULT_TIMEOUT_SECONDS = 10.0
#: How long a checked resolution of a push service's name is reused. Short enough that a
#: change of address is followed soon; long enough that a fan-out to thousands of browsers on
#: one push service resolves once and keeps its keep-alive connections on one address.
PIN_SECONDS = 30.0

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_JWT_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ES256"}').rstrip(b"=")

OutcomeStatus = Literal[
    "sent",
    "gone",
    "too_large",
    "rate_limited",
    "retry",
    "config_error",
    "invalid_subscription",
    "refused_destination",
]


class InvalidPushOptions(WebPushError, ValueError):
    """TTL, Urgency or Topic would be refused by a push service; fix the caller."""


class PayloadTooLarge(WebPushError, ValueError):
    """The plaintext does not fit the single record RFC 8291 guarantees (3993 bytes)."""

    def __init__(self, size: int) -> None:
        super().__init__(
            f"push payload is {size} bytes; at most {MAX_PAYLOAD_BYTES} fit in one "
            "RFC 8291 record. Send less (an id to fetch) rather than the full content."
        )
        self.size = size


class InvalidSubscription(ValueError):
    """A stored or submitted subscription cannot be used: bad endpoint or keys."""


@dataclass(frozen=True)
class PushSubscription:
    """A subscription checked once, so sending does not re-parse keys per message."""

    endpoint: str
    origin: str
    p256dh: bytes = field(repr=False)
    auth: bytes = field(repr=False)


def _origin_of(endpoint: str, *, allow_http: bool) -> str:
    parts = urlsplit(endpoint)
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise InvalidSubscription(f"push endpoint must be an https URL, got {endpoint[:80]!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidSubscription(f"push endpoint has an invalid port: {endpoint[:80]!r}") from exc
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default_port else "")


def parse_subscription(
    subscription: Mapping[str, object], *, allow_http: bool = False
) -> PushSubscription:
    """Validate ``PushSubscription.toJSON()`` output; use it when storing, not only sending.

    Checking at subscribe time keeps garbage out of the table; checking again at send time
    protects against rows written by older code.
    """
    endpoint = subscription.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidSubscription("subscription has no endpoint")
    origin = _origin_of(endpoint, allow_http=allow_http)
    keys = subscription.get("keys")
    if not isinstance(keys, Mapping):
        raise InvalidSubscription("subscription has no keys (p256dh, auth)")
    p256dh_text, auth_text = keys.get("p256dh"), keys.get("auth")
    if not isinstance(p256dh_text, str) or not isinstance(auth_text, str):
        raise InvalidSubscription("subscription keys p256dh and auth must be strings")
    try:
        p256dh = _b64url_decode(p256dh_text)
        auth = _b64url_decode(auth_text)
    except (ValueError, binascii.Error) as exc:
        raise InvalidSubscription("subscription keys are not base64url") from exc
    if len(p256dh) != 65 or p256dh[0] != 4:
        raise InvalidSubscription("p256dh must be an uncompressed P-256 point (65 bytes)")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError as exc:
        raise InvalidSubscription("p256dh is not a point on P-256") from exc
    if len(auth) != 16:
        raise InvalidSubscription("auth secret must be 16 bytes")
    return PushSubscription(endpoint=endpoint, origin=origin, p256dh=p256dh, auth=auth)


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class PushOutcome:
    """What happened to one message, phrased as what the caller should do next.

    ``gone``, ``invalid_subscription`` and ``refused_destination`` (the endpoint is, or now
    resolves to, a private or reserved address): deactivate the subscription with exactly
    this ``endpoint``. ``rate_limited`` and ``retry``: try again later (``retry_after`` seconds
    when the push service said so). ``config_error``: our VAPID key, subject or request is
    wrong; retrying or deactivating will not help, an operator must look. ``too_large``:
    the payload must shrink.
    """

    status: OutcomeStatus
    endpoint: str
    http_status: int | None = None
    retry_after: float | None = None
    detail: str = ""

    @property
    def delivered(self) -> bool:
        return self.status == "sent"

    @property
    def should_deactivate(self) -> bool:
        return self.status in ("gone", "invalid_subscription", "refused_destination")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Turn ``Retry-After`` (delta-seconds or HTTP-date) into seconds from now, or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form may lack the zone
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _classify(endpoint: str, response: urllib3.BaseHTTPResponse) -> PushOutcome:
    code = response.status
    detail = response.reason or ""
    if 200 <= code < 300:
        return PushOutcome("sent", endpoint, code)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if code in (404, 410):
        return PushOutcome("gone", endpoint, code, detail=detail)
    if code == 413:
        return PushOutcome("too_large", endpoint, code, detail=detail)
    if code == 429:
        return PushOutcome("rate_limited", endpoint, code, retry_after, detail)
    if code >= 500 or code == 408:
        return PushOutcome("retry", endpoint, code, retry_after, detail)
    # 400/401/403 and anything else unexpected (3xx: push services do not redirect): the
    # request we built or the key we signed with is wrong, not this subscription.
    body = response.data[:200].decode("utf-8", "replace") if response.data else ""
    return PushOutcome("config_error", endpoint, code, detail=f"{detail} {body}".strip())


# --------------------------------------------------------------------------- sender


def make_push_pool(
    *, num_pools: int = 8, maxsize: int = 16, ca_certs: str | None = None
) -> urllib3.PoolManager:
    """A connection pool sized for push fan-out.

    ``num_pools`` is the number of push service hosts kept (FCM, Mozilla, Apple, Windows...),
    ``maxsize`` the keep-alive connections kept per host, which must be at least the number
    of sending threads or urllib3 opens and discards extra connections. Certificates are
    always verified, against ``certifi`` unless ``ca_certs`` names another bundle. Proxy
    settings from the environment are ignored on purpose: push traffic goes direct.
    """
    return urllib3.PoolManager(
        num_pools=num_pools,
        maxsize=maxsize,
        block=False,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_certs or certifi.where(),
        retries=False,
    )


class WebPushSender:
    """Sends encrypted, VAPID-signed messages and classifies each answer.

    One instance is meant to live as long as the worker: it holds the connection pool.
    It is safe to share between threads (the key is immutable, claims are built per
    request, and urllib3's pool is thread-safe).
    """

    def __init__(
        self,
        vapid_private_key: VapidKeys | str | bytes | os.PathLike[str],
        subject: str,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT_SECONDS,
        pool: urllib3.PoolManager | None = None,
        *,
        allow_http: bool = False,
        allow_private: bool = False,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        """``allow_http`` exists for local test push services only; browsers hand out https.
        ``allow_private`` lets endpoints reach loopback, private and reserved addresses
        (``WEBHOOK_ALLOW_PRIVATE_NETWORKS``: a push service on one's own machine); ``resolver``
        is ``socket.getaddrinfo`` unless a test maps names itself."""
        self.keys = (
            vapid_private_key
            if isinstance(vapid_private_key, VapidKeys)
            else load_vapid_private_key(vapid_private_key)
        )
        self.subject = _check_subject(subject)
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        if connect <= 0 or read <= 0:
            raise ValueError("timeout must be positive seconds, (connect, read) or one value")
        self.timeout = urllib3.Timeout(connect=connect, read=read)
        self.allow_http = allow_http
        self.allow_private = allow_private
        self.resolver = resolver
        self._pins: dict[tuple[str, int], tuple[float, str]] = {}
        self._pins_lock = threading.Lock()
        self._owns_pool = pool is None
        self.pool = pool if pool is not None else make_push_pool()
        self._k = self.keys.public_key

    # -- lifecycle

    def close(self) -> None:
        """Close pooled connections if the pool was created here."""
        if self._owns_pool:
            self.pool.clear()

    def __enter__(self) -> WebPushSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- building blocks

    def vapid_authorization(self, audience: str, *, now: float | None = None) -> str:
        """``Authorization`` header value for one request to ``audience``.

        The claims dict is built here for every request so that ``aud`` can never leak
        from one push service to another (the pywebpush trap).
        """
        issued = int(time.time() if now is None else now)
        claims = {
            "aud": audience,
            "exp": issued + VAPID_TOKEN_LIFETIME_SECONDS,
            "sub": self.subject,
        }
        payload = base64.urlsafe_b64encode(
            json.dumps(claims, separators=(",", ":")).encode("utf-8")
        ).rstrip(b"=")
        signing_input = _JWT_HEADER + b"." + payload
        r, s = decode_dss_signature(
            self.keys.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        )
        signature = _b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return f"vapid t={signing_input.decode('ascii')}.{signature}, k={self._k}"

    @staticmethod
    def encrypt(subscription: PushSubscription, payload: bytes) -> bytes:
        """RFC 8291 ``aes128gcm`` body with a fresh ephemeral key and salt per message."""
        return http_ece.encrypt(
            payload,
            salt=os.urandom(16),
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=subscription.p256dh,
            auth_secret=subscription.auth,
            version="aes128gcm",
        )

    # -- sending

    def send(
        self,
        subscription: Mapping[str, object] | PushSubscription,
        payload: bytes,
        *,
        ttl: int,
        urgency: str = "normal",
        topic: str | None = None,
    ) -> PushOutcome:
        """Deliver one message. Raises only for caller mistakes, never for the network.

        ``ttl`` has no default on purpose: how long a message stays worth showing is a
        product decision, and ``0`` (pywebpush's default) drops it for any offline device.
        """
        headers = _base_headers(ttl, urgency, topic)
        _check_payload(payload)
        return self._send_checked(subscription, payload, headers)

    def send_many(
        self,
        subscriptions: Iterable[Mapping[str, object] | PushSubscription],
        payload: bytes,
        *,
        ttl: int,
        urgency: str = "normal",
        topic: str | None = None,
        workers: int = 1,
    ) -> list[PushOutcome]:
        """Send the same message to many subscriptions, outcomes in input order.

        Options and size are validated once before anything is sent, so a bad call fails
        before the first message rather than half way. ``workers > 1`` overlaps network
        waits on a few threads sharing the connection pool; keep it at or below the
        pool's ``maxsize``.
        """
        headers = _base_headers(ttl, urgency, topic)
        _check_payload(payload)
        items: Sequence[Mapping[str, object] | PushSubscription] = list(subscriptions)
        if workers <= 1 or len(items) <= 1:
            return [self._send_checked(item, payload, headers) for item in items]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webpush") as pool:
            return list(pool.map(lambda item: self._send_checked(item, payload, headers), items))

    def _send_checked(
        self,
        subscription: Mapping[str, object] | PushSubscription,
        payload: bytes,
        base_headers: Mapping[str, str],
    ) -> PushOutcome:
        if isinstance(subscription, PushSubscription):
            parsed = subscription
        else:
            try:
                parsed = parse_subscription(subscription, allow_http=self.allow_http)
            except InvalidSubscription as exc:
                endpoint = subscription.get("endpoint")
                return PushOutcome(
                    "invalid_subscription",
                    endpoint if isinstance(endpoint, str) else "",
                    detail=str(exc),
                )
        try:
            pinned = self._pin(parsed.endpoint)
        except RefusedDestination as exc:
            # The rule's own sentence, never a resolver's error text. A name that does not
            # resolve may be a passing DNS failure at a real push service: try again later.
            status: OutcomeStatus = ("retry" if exc.reason == "unresolvable"
                                     else "refused_destination")
            return PushOutcome(status, parsed.endpoint, detail=f"{exc.reason}: {exc}")
        headers = dict(base_headers)
        headers["Authorization"] = self.vapid_authorization(parsed.origin)
        headers["Host"] = pinned.host_header
        body = b""
        if payload:
            body = self.encrypt(parsed, bytes(payload))
            headers["Content-Encoding"] = "aes128gcm"
            headers["Content-Type"] = "application/octet-stream"
        destination = pinned.destination
        # Keyed by address and name (urllib3's PoolKey holds server_hostname and
        # assert_hostname), so connections to one push service are reused as before.
        tls = ({"server_hostname": pinned.server_hostname,
                "assert_hostname": pinned.server_hostname}
               if destination.scheme == "https" else None)
        try:
            connection = self.pool.connection_from_host(
                pinned.address, destination.port, destination.scheme, pool_kwargs=tls)
            response = connection.urlopen(
                "POST",
                destination.target,
                body=body,
                headers=headers,
                timeout=self.timeout,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=True,  # read it all so the connection goes back to the pool
            )
        except urllib3.exceptions.NewConnectionError as exc:  # a TimeoutError subclass
            return PushOutcome("retry", parsed.endpoint, detail=_network_detail("cannot connect",
                                                                               exc))
        except urllib3.exceptions.TimeoutError as exc:
            return PushOutcome("retry", parsed.endpoint, detail=_network_detail("timeout", exc))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return PushOutcome("retry", parsed.endpoint, detail=_network_detail("network error",
                                                                               exc))
        return _classify(parsed.endpoint, response)

    def _pin(self, endpoint: str) -> Pinned:
        """The destination rule at send time: the checked address to connect to.

        A checked resolution is reused for :data:`PIN_SECONDS` (only ever a checked one: a
        refusal is not remembered, and the rule runs again after that time)."""
        destination = check_url(endpoint, allow_private=self.allow_private,
                                schemes=("https", "http") if self.allow_http else ("https",))
        key = (destination.host, destination.port)
        now = time.monotonic()
        with self._pins_lock:
            cached = self._pins.get(key)
        if cached is not None and cached[0] > now:
            return Pinned(destination, cached[1])
        pinned = pin(destination, allow_private=self.allow_private, resolver=self.resolver)
        with self._pins_lock:
            if len(self._pins) > 1000:
                self._pins.clear()
            self._pins[key] = (now + PIN_SECONDS, pinned.address)
        return pinned


def _network_detail(kind: str, exc: BaseException) -> str:
    """What went wrong, by kind and exception class; never the error's text, which names the
    address and port tried (and would make stored deliveries a map of the network)."""
    tls = isinstance(exc, urllib3.exceptions.SSLError | ssl.SSLError) or isinstance(
        getattr(exc, "reason", None), ssl.SSLError)
    return f"{kind} ({'TLS, ' if tls else ''}{type(exc).__name__})"


def _check_payload(payload: bytes) -> None:
    if not isinstance(payload, bytes | bytearray):
        raise TypeError("push payload must be bytes; encode text as UTF-8 first")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(len(payload))


def _base_headers(ttl: int, urgency: str, topic: str | None) -> dict[str, str]:
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL_SECONDS:
        raise InvalidPushOptions(
            f"TTL must be whole seconds between 0 and {MAX_TTL_SECONDS}, got {ttl!r}"
        )
    if urgency not in URGENCIES:
        raise InvalidPushOptions(f"Urgency must be one of {', '.join(URGENCIES)}, got {urgency!r}")
    headers = {"TTL": str(ttl), "Urgency": urgency}
    if topic is not None:
        if not _TOPIC_RE.fullmatch(topic):
            raise InvalidPushOptions(
                f"Topic must be 1 to 32 base64url characters (A-Z a-z 0-9 - _), got {topic!r}"
            )
        headers["Topic"] = topic
    return headers
