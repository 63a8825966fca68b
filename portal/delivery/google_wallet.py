"""Google Wallet REST client: insert, read and update loyalty classes and objects.

No Flask and no database here: the delivery jobs call it with bodies built by
``passes.google`` and decide what to do with the classified errors it raises.

Authentication uses google-auth's service-account credentials (JWT-bearer grant against
the ``token_uri`` in the key file) but a plain ``requests.Session`` that this client owns,
not ``google.auth.transport.requests.AuthorizedSession``: since google-auth 2.4x the latter
starts a background "regional access boundary" lookup against iamcredentials.googleapis.com
on every request, an outbound call and a thread we neither need nor want. Here the token is
cached on the credentials and refreshed only when stale (or after a 401), and the session
keeps one pooled connection per host.
"""

from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import requests
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import TokenState
from google.auth.transport.requests import Request as AuthRequest
from google.oauth2 import service_account

DEFAULT_BASE_URL = "https://walletobjects.googleapis.com/walletobjects/v1"
WALLET_SCOPE = "https://www.googleapis.com/auth/wallet_object.issuer"
NOTIFY_ON_UPDATE = "NOTIFY_ON_UPDATE"

#: (connect, read) seconds. Google answers in well under a second; a stuck call should free
#: the worker and be retried later rather than hold a delivery slot.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 20.0)


class GoogleWalletError(Exception):
    """A call to Google Wallet failed; ``retryable`` tells the caller whether to try again."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class GoogleWalletRetryableError(GoogleWalletError):
    """Transient: 429, 5xx, timeouts, connection errors. ``retry_after`` is Google's hint."""

    retryable = True


class GoogleWalletPermanentError(GoogleWalletError):
    """Our request is wrong (4xx): retrying the same call cannot succeed."""


class GoogleWalletNotFoundError(GoogleWalletPermanentError):
    """The class or object does not exist (404)."""


class GoogleWalletConflictError(GoogleWalletPermanentError):
    """Insert of an id that already exists (409)."""


@dataclass(frozen=True)
class Ensured:
    """Result of :meth:`GoogleWalletClient.ensure_class` / ``ensure_object``."""

    resource: dict[str, Any]
    created: bool


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _google_message(response: requests.Response) -> tuple[str, str | None]:
    """Google's own error text (``{"error": {"message", "status"}}``), else the raw body."""
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:500] or response.reason or "no message"), None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or response.reason), error.get("status")
    if isinstance(error, str):  # OAuth-style {"error": "...", "error_description": "..."}
        return str(data.get("error_description") or error), error
    return (response.text.strip()[:500] or response.reason or "no message"), None


def classify_response(response: requests.Response, action: str) -> GoogleWalletError:
    """Turn a non-2xx answer into the exception a caller can act on."""
    message, reason = _google_message(response)
    status = response.status_code
    text = f"{action}: HTTP {status}: {message}"
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429 or status == 408 or status >= 500:
        return GoogleWalletRetryableError(
            text, status=status, reason=reason, retry_after=retry_after
        )
    if status == 404:
        return GoogleWalletNotFoundError(text, status=status, reason=reason)
    if status == 409:
        return GoogleWalletConflictError(text, status=status, reason=reason)
    return GoogleWalletPermanentError(text, status=status, reason=reason)


class GoogleWalletClient:
    """One issuer's connection to the Google Wallet REST API.

    Meant to live for a worker's lifetime (the token and the TCP connection are reused
    across calls); close it, or use it as a context manager, when the worker stops.
    """

    def __init__(
        self,
        service_account_file: str | os.PathLike[str],
        *,
        base_url: str = DEFAULT_BASE_URL,
        scopes: tuple[str, ...] = (WALLET_SCOPE,),
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
    ) -> None:
        self.credentials = service_account.Credentials.from_service_account_file(
            os.fspath(service_account_file), scopes=list(scopes)
        )
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._owns_session = session is None
        self.session = session if session is not None else requests.Session()
        self._token_lock = threading.Lock()
        self._token_request = _TokenRequest(self.session, timeout)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release pooled connections (only if the session is ours)."""
        if self._owns_session:
            self.session.close()

    def __enter__(self) -> GoogleWalletClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- token

    def _access_token(self, *, force: bool = False) -> str:
        """The cached access token, fetched again only when stale or rejected."""
        with self._token_lock:
            if force or self.credentials.token_state is not TokenState.FRESH:
                try:
                    self.credentials.refresh(self._token_request)
                except auth_exceptions.RefreshError as exc:
                    error_class = (
                        GoogleWalletRetryableError if exc.retryable else GoogleWalletPermanentError
                    )
                    raise error_class(f"token request refused: {exc}") from exc
                except auth_exceptions.TransportError as exc:
                    raise GoogleWalletRetryableError(f"token endpoint unreachable: {exc}") from exc
            token = self.credentials.token
            if not isinstance(token, str) or not token:
                raise GoogleWalletPermanentError("token endpoint returned no access token")
            return token

    # ----------------------------------------------------------------- transport

    def _request(
        self, method: str, path: str, action: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        data = None if body is None else json.dumps(body)
        response = self._send(method, url, action, data, self._access_token())
        if response.status_code == 401:
            # The token may have been revoked or expired early: fetch one more, once.
            response = self._send(method, url, action, data, self._access_token(force=True))
        if response.status_code >= 400:
            raise classify_response(response, action)
        if not response.content:
            return {}
        result = response.json()
        return result if isinstance(result, dict) else {"value": result}

    def _send(
        self, method: str, url: str, action: str, data: str | None, token: str
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        try:
            return self.session.request(
                method, url, data=data, headers=headers, timeout=self.timeout
            )
        except requests.Timeout as exc:
            raise GoogleWalletRetryableError(f"{action}: timed out: {exc}") from exc
        except requests.ConnectionError as exc:
            raise GoogleWalletRetryableError(f"{action}: connection failed: {exc}") from exc

    # ----------------------------------------------------------------- classes

    def get_class(self, class_id: str) -> dict[str, Any]:
        """The LoyaltyClass; raises :class:`GoogleWalletNotFoundError` when missing."""
        return self._request("GET", f"loyaltyClass/{_quote(class_id)}", f"get class {class_id}")

    def insert_class(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a LoyaltyClass; raises :class:`GoogleWalletConflictError` if it exists."""
        return self._request("POST", "loyaltyClass", f"insert class {body.get('id')}", body)

    def ensure_class(self, body: dict[str, Any]) -> Ensured:
        """Create the class unless it exists; an existing class is returned untouched."""
        return self._ensure("loyaltyClass", body)

    # ----------------------------------------------------------------- objects

    def get_object(self, object_id: str) -> dict[str, Any]:
        """The LoyaltyObject; raises :class:`GoogleWalletNotFoundError` when missing."""
        return self._request("GET", f"loyaltyObject/{_quote(object_id)}", f"get object {object_id}")

    def insert_object(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a LoyaltyObject; raises :class:`GoogleWalletConflictError` if it exists."""
        return self._request("POST", "loyaltyObject", f"insert object {body.get('id')}", body)

    def ensure_object(self, body: dict[str, Any]) -> Ensured:
        """Create the object unless it exists (e.g. saved from a link, or a retried job)."""
        return self._ensure("loyaltyObject", body)

    def patch_object(
        self, object_id: str, body: dict[str, Any], *, notify: bool = False
    ) -> dict[str, Any]:
        """Update some fields of a LoyaltyObject.

        ``notify`` adds ``notifyPreference: NOTIFY_ON_UPDATE`` so Google tells the member;
        a body that already carries it (``build_points_patch``) is sent as is.
        """
        payload = dict(body)
        if notify:
            payload["notifyPreference"] = NOTIFY_ON_UPDATE
        return self._request(
            "PATCH", f"loyaltyObject/{_quote(object_id)}", f"patch object {object_id}", payload
        )

    def add_message(self, object_id: str, message: dict[str, Any]) -> dict[str, Any]:
        """Attach a message (``build_message``) to a card; TEXT_AND_NOTIFY ones notify."""
        return self._request(
            "POST",
            f"loyaltyObject/{_quote(object_id)}/addMessage",
            f"add message to object {object_id}",
            {"message": message},
        )

    # ----------------------------------------------------------------- helpers

    def _ensure(self, collection: str, body: dict[str, Any]) -> Ensured:
        resource_id = body.get("id")
        if not isinstance(resource_id, str) or not resource_id:
            raise GoogleWalletPermanentError(f"{collection} body has no id")
        path = f"{collection}/{_quote(resource_id)}"
        try:
            return Ensured(self._request("GET", path, f"get {resource_id}"), created=False)
        except GoogleWalletNotFoundError:
            pass
        try:
            created = self._request("POST", collection, f"insert {resource_id}", body)
            return Ensured(created, created=True)
        except GoogleWalletConflictError:
            # Someone (another worker, or the member saving the link) created it meanwhile.
            return Ensured(self._request("GET", path, f"get {resource_id}"), created=False)


def _quote(resource_id: str) -> str:
    return quote(resource_id, safe="")


class _TokenRequest(AuthRequest):
    """google-auth's transport bound to our session and timeout.

    Its parent uses a 120 s timeout by default and closes the session when garbage
    collected, even a session it was given; the session belongs to the client here.
    """

    def __init__(self, session: requests.Session, timeout: float | tuple[float, float]) -> None:
        super().__init__(session=session)
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(
            url,
            method=method,
            body=body,
            headers=headers,
            timeout=self._timeout if timeout is None else timeout,
            **kwargs,
        )

    def __del__(self) -> None:
        """Leave the session alone: :meth:`GoogleWalletClient.close` owns its lifetime."""
