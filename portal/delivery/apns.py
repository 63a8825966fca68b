"""Apple Push Notification service client for Wallet pass updates.

A pass update push carries no content: it only tells the device "ask the web service what
changed".  The lock-screen text comes from the ``changeMessage`` of the fields that changed
in the new pass, never from the push payload, which is therefore always ``{"aps":{}}``.

Design choices, from Apple's "Sending notification requests to APNs" and the Wallet
documentation:

* HTTP/2, one long-lived connection reused for every push (APNs treats rapid connect /
  disconnect as a denial-of-service attempt).
* Token-based authentication: an ES256 JWT (``iss`` = team id, ``iat``, header ``kid``),
  reused for ~50 minutes; APNs refuses tokens older than an hour and answers
  ``TooManyProviderTokenUpdates`` when a token is replaced more than once every 20 minutes.
* ``apns-topic`` is the pass type identifier.  Wallet pushes are silent, so the request is
  sent as ``apns-push-type: background`` with ``apns-priority: 5`` (the only priority
  Apple allows for background pushes).
* Wallet passes are always pushed through the production gateway, even when the pass is
  signed with a development certificate.

Nothing here knows about Flask or the database: the caller gives push tokens and gets one
:class:`PushResult` per token, and decides what to do (drop ``gone`` registrations, queue
``retry`` ones again).
"""

from __future__ import annotations

import base64
import email.utils
import enum
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

logger = logging.getLogger(__name__)

PRODUCTION_URL: Final = "https://api.push.apple.com"
SANDBOX_URL: Final = "https://api.sandbox.push.apple.com"
PASS_UPDATE_PAYLOAD: Final = b'{"aps":{}}'
#: Explicit timeouts: a stalled APNs stream must not hold a worker forever.
DEFAULT_TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)

_TOKEN_RE: Final = re.compile(r"^[0-9A-Fa-f]{16,200}$")


class PushOutcome(enum.StrEnum):
    """What the caller should do with a push token after a push."""

    DELIVERED = "delivered"  #: 200: APNs accepted the push.
    GONE = "gone"  #: 410: the device no longer wants updates; drop the registration.
    RETRY = "retry"  #: 429, 5xx, timeout or connection error: push again later.
    REJECTED = "rejected"  #: other 4xx: a request or configuration problem (see ``reason``).


@dataclass(frozen=True)
class PushResult:
    """The outcome of one push to one token."""

    token: str
    outcome: PushOutcome
    status: int | None = None
    reason: str | None = None
    #: Seconds to wait before retrying, when APNs said so (``Retry-After``).
    retry_after: float | None = None
    apns_id: str | None = None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def es256_jwt(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, issued_at: int) -> str:
    """Return an APNs provider token (compact JWS, ES256, raw ``r‖s`` signature)."""
    header = _b64url(json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":")).encode())
    claims = _b64url(json.dumps({"iss": team_id, "iat": issued_at}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class ProviderToken:
    """The JWT sent as ``authorization: bearer``, refreshed on Apple's schedule.

    Refreshed after :attr:`REFRESH_AFTER` seconds (Apple rejects tokens older than one
    hour), and never more often than every :attr:`MIN_INTERVAL` seconds, even when APNs
    says the token expired (which then points to a skewed clock, not to an old token).
    """

    REFRESH_AFTER: Final = 50 * 60
    MIN_INTERVAL: Final = 20 * 60

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("APNs signing keys are EC P-256 keys")
        self._key, self._key_id, self._team_id, self._clock = key, key_id, team_id, clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._issued_at = 0.0

    def current(self) -> str:
        """Return the token to send now, minting a new one when the old one is due."""
        with self._lock:
            now = self._clock()
            if self._token is None or now - self._issued_at >= self.REFRESH_AFTER:
                self._mint(now)
            assert self._token is not None
            return self._token

    def refresh_if_allowed(self) -> bool:
        """Replace the token now if the 20-minute floor allows it; say whether it did."""
        with self._lock:
            now = self._clock()
            if self._token is not None and now - self._issued_at < self.MIN_INTERVAL:
                return False
            self._mint(now)
            return True

    def _mint(self, now: float) -> None:
        self._token = es256_jwt(self._key, self._key_id, self._team_id, int(now))
        self._issued_at = now


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _reason(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    reason = body.get("reason") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) else None


class APNsClient:
    """Sends Wallet pass update pushes over one persistent HTTP/2 connection.

    ``ca_file`` adds a trust anchor for a non-Apple endpoint (a local stand-in in tests);
    Apple's own endpoints are verified against the system store.  Create one per worker
    process, reuse it for every push, and :meth:`close` it on exit.
    """

    def __init__(
        self,
        *,
        team_id: str,
        key_id: str,
        signing_key: ec.EllipticCurvePrivateKey | bytes,
        topic: str,
        base_url: str = PRODUCTION_URL,
        ca_file: str | Path | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        trust_env: bool = True,
    ) -> None:
        if isinstance(signing_key, bytes):
            loaded = serialization.load_pem_private_key(signing_key, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError("the APNs key (.p8) must be an EC private key")
            signing_key = loaded
        if not topic:
            raise ValueError("topic (the pass type identifier) is required")
        self.topic = topic
        self._clock = clock
        self._token = ProviderToken(signing_key, key_id, team_id, clock)
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self._http = httpx.Client(
            base_url=base_url,
            http1=False,
            http2=True,
            verify=verify,
            timeout=timeout,
            trust_env=trust_env,
            # One connection carries every stream; keep it open between bursts.
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=3300.0
            ),
        )

    @classmethod
    def from_key_file(
        cls, key_path: str | Path, *, team_id: str, key_id: str, topic: str, **options: Any
    ) -> APNsClient:
        """Build a client from Apple's ``AuthKey_<KEYID>.p8`` file (other options as above)."""
        return cls(
            team_id=team_id,
            key_id=key_id,
            signing_key=Path(key_path).read_bytes(),
            topic=topic,
            **options,
        )

    def __enter__(self) -> APNsClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP/2 connection."""
        self._http.close()

    def send(self, push_tokens: Iterable[str]) -> list[PushResult]:
        """Push a pass update to every token, in order; one result per token.

        Never raises for a per-token failure: network problems become ``retry`` results so
        that one bad moment does not lose the outcome of the pushes already made.
        """
        return [self._contained_push(token) for token in push_tokens]

    def _contained_push(self, token: str) -> PushResult:
        try:
            return self._push(token)
        except Exception as exc:  # anything else: this token's failure, retried later
            logger.error("APNs push raised %s; retried later", type(exc).__name__)
            return PushResult(token, PushOutcome.RETRY, reason=f"error: {type(exc).__name__}")

    def _push(self, token: str) -> PushResult:
        if not _TOKEN_RE.match(token):
            # Never put an unchecked string into the request path.
            return PushResult(token, PushOutcome.REJECTED, reason="BadDeviceToken")
        result = self._attempt(token)
        if result.reason == "ExpiredProviderToken" and self._token.refresh_if_allowed():
            result = self._attempt(token)
        if result.outcome is PushOutcome.REJECTED:
            logger.warning("APNs rejected a push: %s %s", result.status, result.reason)
        return result

    def _attempt(self, token: str) -> PushResult:
        headers = {
            "authorization": f"bearer {self._token.current()}",
            "apns-topic": self.topic,
            "apns-push-type": "background",
            "apns-priority": "5",
            "content-type": "application/json",
        }
        try:
            response = self._http.post(
                f"/3/device/{token}", content=PASS_UPDATE_PAYLOAD, headers=headers
            )
        except httpx.TimeoutException as exc:
            return PushResult(token, PushOutcome.RETRY, reason=f"timeout: {type(exc).__name__}")
        except httpx.TransportError as exc:
            return PushResult(
                token, PushOutcome.RETRY, reason=f"connection error: {type(exc).__name__}"
            )
        status = response.status_code
        apns_id = response.headers.get("apns-id")
        if status == 200:
            return PushResult(token, PushOutcome.DELIVERED, status=status, apns_id=apns_id)
        reason = _reason(response)
        if status == 410:
            return PushResult(token, PushOutcome.GONE, status, reason, apns_id=apns_id)
        if status == 429 or status >= 500:
            return PushResult(
                token,
                PushOutcome.RETRY,
                status,
                reason,
                retry_after=_retry_after(response.headers.get("retry-after"), self._clock()),
                apns_id=apns_id,
            )
        return PushResult(token, PushOutcome.REJECTED, status, reason, apns_id=apns_id)
