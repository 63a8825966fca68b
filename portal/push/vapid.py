"""VAPID (RFC 8292) keys and subject: generated once, loaded strictly, never replaced.

A new key would orphan every browser subscription made with the old
``applicationServerKey``, so loading a missing or broken key fails loudly instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class WebPushError(Exception):
    """Base class for errors that are ours to fix, never a single subscription's."""


class VapidKeyError(WebPushError, ValueError):
    """The VAPID private key is missing or unusable.

    Raised instead of generating a replacement: a new key would silently orphan every
    subscription made with the old ``applicationServerKey``.
    """


class VapidSubjectError(WebPushError, ValueError):
    """The VAPID ``sub`` claim is not a ``mailto:`` or ``https:`` URI (Safari rejects others)."""


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding, as browsers and libraries disagree."""
    text = text.strip()
    if not _B64URL_RE.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))


# --------------------------------------------------------------------------- VAPID keys


@dataclass(frozen=True)
class VapidKeys:
    """The application server's P-256 key pair.

    ``public_key`` is what the browser's ``pushManager.subscribe`` takes as
    ``applicationServerKey``; every subscription is bound to it, so the pair is generated
    once and kept as long as any subscription made with it should keep working.
    """

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    private_pem: str = field(repr=False)
    public_key: str

    @property
    def private_key_b64url(self) -> str:
        """The raw 32-byte private scalar, base64url: the format Node's ``web-push`` uses."""
        return _b64url_encode(self.private_key.private_numbers().private_value.to_bytes(32, "big"))


def _keys_from_private(private_key: ec.EllipticCurvePrivateKey) -> VapidKeys:
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    raw_public = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return VapidKeys(
        private_key=private_key, private_pem=pem, public_key=_b64url_encode(raw_public)
    )


def generate_vapid_keys() -> VapidKeys:
    """Make a new VAPID key pair. Call once per deployment and store the PEM as a secret."""
    return _keys_from_private(ec.generate_private_key(ec.SECP256R1()))


def save_vapid_private_key(keys: VapidKeys, path: str | os.PathLike[str]) -> Path:
    """Write the private key PEM, readable by the owner only, refusing to overwrite.

    Overwriting an existing key is how deployments lose every subscription at once, so an
    existing file is an error, not something to replace.
    """
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise VapidKeyError(
            f"{target} already exists; refusing to replace a VAPID key that existing "
            "subscriptions depend on"
        ) from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(keys.private_pem)
    return target


def load_vapid_private_key(source: str | bytes | os.PathLike[str]) -> VapidKeys:
    """Load the VAPID private key from PEM text, a PEM file, or a raw base64url scalar.

    Unlike ``py_vapid.Vapid.from_file`` this never creates a key when the file is missing:
    a silently regenerated key orphans every subscription, which is far worse than refusing
    to start.
    """
    if isinstance(source, bytes):
        pem: bytes = source
    elif isinstance(source, str) and "-----BEGIN" in source:
        pem = source.encode("ascii", "replace")
    elif isinstance(source, str) and re.fullmatch(r"[A-Za-z0-9_-]{43}=?", source.strip()):
        return _keys_from_raw_scalar(source.strip())
    else:
        path = Path(source)
        if not path.is_file():
            raise VapidKeyError(
                f"VAPID private key file {str(path)!r} does not exist. Generate the key once "
                "(generate_vapid_keys + save_vapid_private_key) and point the configuration at "
                "it; a new key would invalidate every existing push subscription."
            )
        pem = path.read_bytes()
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise VapidKeyError(
            f"VAPID private key is not a readable unencrypted PEM key: {exc}"
        ) from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise VapidKeyError("VAPID private key must be an EC key on the P-256 curve")
    return _keys_from_private(loaded)


def _keys_from_raw_scalar(text: str) -> VapidKeys:
    try:
        value = int.from_bytes(_b64url_decode(text), "big")
        private_key = ec.derive_private_key(value, ec.SECP256R1())
    except (ValueError, binascii.Error) as exc:
        raise VapidKeyError(f"VAPID private key is not a valid P-256 scalar: {exc}") from exc
    return _keys_from_private(private_key)


# --------------------------------------------------------------------------- subscriptions


def _check_subject(subject: str) -> str:
    subject = subject.strip() if isinstance(subject, str) else ""
    parts = urlsplit(subject)
    if parts.scheme == "mailto" and "@" in parts.path:
        return subject
    if parts.scheme == "https" and parts.hostname:
        return subject
    raise VapidSubjectError(
        f"VAPID subject must be a mailto: address or an https: URL, got {subject!r}"
    )
