"""Apple Wallet loyalty cards: from plain data to a signed ``.pkpass``.

The card is rebuilt and re-signed every time a member's balance, tier or news changes (the
device fetches the new file after an update push), so building is on the hot path: the
credentials are parsed once (:func:`load_credentials`), default images are cached, and the
archive is written without recompressing PNGs.

Everything a device would reject or silently show wrong is checked *before* signing and
reported as :class:`PassValidationError` naming the offending field, because a broken pass
fails on the phone without any message to the member or to us.

Signing is done directly with ``cryptography`` (detached DER PKCS#7 over ``manifest.json``,
WWDR intermediate embedded, ``signingTime`` attribute), without py-pkpass: see
``docs/architecture.md`` for the reasons.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from passes.apple_validation import (  # noqa: F401  (re-exported)
    PassValidationError,
    _fields,
    parse_colour,
    validate_images,
    validate_pass_json,
    validate_strings,
)
from passes.images import (
    default_pass_images,
)

PKPASS_MEDIA_TYPE: Final = "application/vnd.apple.pkpass"

#: Localisation keys a :class:`StoreCard` looks up in ``<locale>.lproj/pass.strings``.
#: ``*.changeMessage`` values must contain ``%@`` (replaced by the new value on the lock screen).
STRING_KEYS: Final = (
    "points.label",
    "points.changeMessage",
    "tier.label",
    "tier.changeMessage",
    "nextTier.label",
    "memberName.label",
    "memberNumber.label",
    "terms.label",
    "manage.label",
)

DEFAULT_STRINGS: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {
        "points.label": "Points",
        "points.changeMessage": "You now have %@ points",
        "tier.label": "Tier",
        "tier.changeMessage": "You are now %@",
        "nextTier.label": "Next tier",
        "memberName.label": "Member",
        "memberNumber.label": "Member number",
        "terms.label": "Terms and conditions",
        "manage.label": "Manage your preferences",
    },
    "fr": {
        "points.label": "Points",
        "points.changeMessage": "Vous avez maintenant %@ points",
        "tier.label": "Statut",
        "tier.changeMessage": "Vous êtes maintenant %@",
        "nextTier.label": "Prochain statut",
        "memberName.label": "Membre",
        "memberNumber.label": "Numéro de membre",
        "terms.label": "Conditions générales",
        "manage.label": "Gérer vos préférences",
    },
}

_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class News:
    """A message to members: shown on the back, and on the lock screen when it changes."""

    header: str
    body: str


@dataclass(frozen=True)
class StoreCard:
    """Everything printed on a member's loyalty card, as plain values.

    ``serial_number`` and ``authentication_token`` must never change once the card has been
    issued: the device identifies the pass and authenticates its update requests with them.
    Colours accept ``rgb(r, g, b)`` or ``#rrggbb``/``#rgb``.  ``images`` maps Apple file
    names (``icon.png``, ``icon@2x.png``, ``logo@3x.png``…) to PNG bytes; when omitted,
    icon and logo are drawn in the card colours.
    """

    pass_type_id: str
    team_id: str
    serial_number: str
    organization_name: str
    description: str
    member_name: str
    member_number: str
    points: int
    tier: str
    next_tier: str | None = None
    web_service_url: str | None = None
    authentication_token: str | None = None
    foreground_color: str = "rgb(255, 255, 255)"
    background_color: str = "rgb(35, 64, 143)"
    label_color: str = "rgb(196, 211, 255)"
    terms: str = ""
    manage_url: str | None = None
    strings: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_STRINGS)
    news: News | None = None
    images: Mapping[str, bytes] | None = None
    relevant_date: dt.datetime | None = None
    logo_text: str | None = None


@dataclass(frozen=True)
class PassCredentials:
    """Parsed signing material, meant to be loaded once per process and reused.

    ``pass_type_id`` and ``team_id`` are read from the certificate subject (``UID`` and
    ``OU`` in Apple-issued certificates) so that a card signed with the wrong certificate
    is refused before it reaches a device.
    """

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    wwdr: x509.Certificate
    pass_type_id: str | None
    team_id: str | None

    @classmethod
    def from_pem(
        cls,
        certificate: bytes,
        private_key: bytes,
        wwdr: bytes,
        password: str | bytes | None = None,
    ) -> PassCredentials:
        """Parse PEM (or DER, as Apple distributes the WWDR ``.cer``) credentials."""
        cert = _load_certificate(certificate)
        secret = password.encode() if isinstance(password, str) else password
        key = serialization.load_pem_private_key(private_key, password=secret or None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("the pass private key must be RSA or EC")
        intermediate = _load_certificate(wwdr)
        return cls(
            certificate=cert,
            private_key=key,
            wwdr=intermediate,
            pass_type_id=_subject_value(cert, NameOID.USER_ID),
            team_id=_subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
        )


def load_credentials(
    cert_path: str | Path,
    key_path: str | Path,
    wwdr_path: str | Path,
    password: str | bytes | None = None,
) -> PassCredentials:
    """Read and parse the Pass Type ID certificate, its key and the WWDR intermediate."""
    return PassCredentials.from_pem(
        Path(cert_path).read_bytes(),
        Path(key_path).read_bytes(),
        Path(wwdr_path).read_bytes(),
        password,
    )


def _load_certificate(data: bytes) -> x509.Certificate:
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _subject_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    values = cert.subject.get_attributes_for_oid(oid)
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode()


def _rgb(colour: tuple[int, int, int]) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


def render_pass_json(card: StoreCard) -> dict[str, Any]:
    """Return the ``pass.json`` document for ``card`` (not yet validated).

    Labels and change messages are localisation keys (see :data:`STRING_KEYS`): Wallet
    replaces them with the ``pass.strings`` entry of the device language.
    """
    secondary: list[dict[str, Any]] = [
        {
            "key": "tier",
            "label": "tier.label",
            "value": card.tier,
            "changeMessage": "tier.changeMessage",
        },
    ]
    if card.next_tier:
        secondary.append({"key": "nextTier", "label": "nextTier.label", "value": card.next_tier})
    back: list[dict[str, Any]] = []
    if card.news is not None:
        # "%@" alone: the lock screen shows the news body itself when it changes.
        back.append(
            {
                "key": "news",
                "label": card.news.header,
                "value": card.news.body,
                "changeMessage": "%@",
            }
        )
    if card.terms:
        back.append({"key": "terms", "label": "terms.label", "value": card.terms})
    if card.manage_url:
        back.append(
            {
                "key": "manage",
                "label": "manage.label",
                "value": card.manage_url,
                "dataDetectorTypes": ["PKDataDetectorTypeLink"],
            }
        )

    document: dict[str, Any] = {
        "formatVersion": 1,
        "passTypeIdentifier": card.pass_type_id,
        "serialNumber": card.serial_number,
        "teamIdentifier": card.team_id,
        "organizationName": card.organization_name,
        "description": card.description,
        "foregroundColor": _rgb(parse_colour(card.foreground_color, "foregroundColor")),
        "backgroundColor": _rgb(parse_colour(card.background_color, "backgroundColor")),
        "labelColor": _rgb(parse_colour(card.label_color, "labelColor")),
        "barcodes": [
            {
                "format": "PKBarcodeFormatQR",
                "message": card.member_number,
                "messageEncoding": "iso-8859-1",
                "altText": card.member_number,
            }
        ],
        "storeCard": {
            "primaryFields": [
                {
                    "key": "points",
                    "label": "points.label",
                    "value": card.points,
                    "numberStyle": "PKNumberStyleDecimal",
                    "changeMessage": "points.changeMessage",
                }
            ],
            "secondaryFields": secondary,
            "auxiliaryFields": [
                {"key": "memberName", "label": "memberName.label", "value": card.member_name},
                {"key": "memberNumber", "label": "memberNumber.label", "value": card.member_number},
            ],
            "backFields": back,
        },
    }
    if card.logo_text:
        document["logoText"] = card.logo_text
    if card.web_service_url is not None or card.authentication_token is not None:
        document["webServiceURL"] = card.web_service_url
        document["authenticationToken"] = card.authentication_token
    if card.relevant_date is not None:
        if card.relevant_date.tzinfo is None:
            raise PassValidationError("relevantDate", "must be timezone-aware")
        document["relevantDate"] = card.relevant_date.isoformat(timespec="seconds")
    return document


def _escape_strings_value(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )


def render_strings_file(table: Mapping[str, str]) -> bytes:
    """Render a ``pass.strings`` file: ``"key" = "value";`` lines, UTF-16 with a BOM.

    Apple documents ``.strings`` files as UTF-16; with the byte-order mark the device never
    has to guess, and accented French text survives intact.
    """
    lines = "".join(
        f'"{_escape_strings_value(key)}" = "{_escape_strings_value(value)}";\n'
        for key, value in sorted(table.items())
    )
    return "\ufeff".encode("utf-16-le") + lines.encode("utf-16-le")


def _used_string_keys(document: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for _group, _index, entry in _fields(document):
        for attribute in ("label", "changeMessage"):
            value = entry.get(attribute)
            if isinstance(value, str) and value in STRING_KEYS:
                keys.append(value)
    return keys


def sign_manifest(manifest: bytes, credentials: PassCredentials) -> bytes:
    """Return the detached DER PKCS#7 signature of ``manifest`` (with signingTime).

    The builder is assembled in this order on purpose: ``set_data`` returns a builder that
    keeps the signers but drops certificates added with ``add_certificate`` (cryptography
    50), which would silently leave the WWDR intermediate out of the signature.
    """
    return (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(manifest)
        .add_signer(credentials.certificate, credentials.private_key, hashes.SHA256())
        .add_certificate(credentials.wwdr)
        .sign(
            serialization.Encoding.DER,
            [
                pkcs7.PKCS7Options.DetachedSignature,
                pkcs7.PKCS7Options.Binary,
                pkcs7.PKCS7Options.NoCapabilities,
            ],
        )
    )


def build_store_card(
    card: StoreCard, credentials: PassCredentials, *, allow_http: bool = False
) -> bytes:
    """Validate ``card``, sign it and return the ``.pkpass`` archive bytes."""
    if not card.serial_number.strip():
        raise PassValidationError("serialNumber", "required, must be a non-empty string")
    if isinstance(card.points, bool) or not isinstance(card.points, int):
        raise PassValidationError("points", f"must be an integer, got {card.points!r}")
    if credentials.pass_type_id and card.pass_type_id != credentials.pass_type_id:
        raise PassValidationError(
            "passTypeIdentifier",
            f"{card.pass_type_id!r} does not match the signing certificate "
            f"({credentials.pass_type_id!r})",
        )
    if credentials.team_id and card.team_id != credentials.team_id:
        raise PassValidationError(
            "teamIdentifier",
            f"{card.team_id!r} does not match the signing certificate ({credentials.team_id!r})",
        )

    document = render_pass_json(card)
    validate_pass_json(document, allow_http=allow_http)
    validate_strings(card.strings, _used_string_keys(document))
    if card.images is None:
        images: Mapping[str, bytes] = default_pass_images(
            card.organization_name[:1],
            parse_colour(card.background_color, "backgroundColor"),
            parse_colour(card.foreground_color, "foregroundColor"),
        )
    else:
        images = card.images
        validate_images(images)

    files: dict[str, bytes] = {
        "pass.json": json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode(),
    }
    files.update(images)
    for locale, table in card.strings.items():
        files[f"{locale}.lproj/pass.strings"] = render_strings_file(table)
    manifest = json.dumps(
        {name: hashlib.sha1(data).hexdigest() for name, data in files.items()},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    files["manifest.json"] = manifest
    files["signature"] = sign_manifest(manifest, credentials)
    return _zip(files)


def _zip(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            # PNGs and the DER signature do not shrink: store them, deflate only text.
            if name.endswith((".json", ".strings")):
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data, compresslevel=6)
            else:
                info.compress_type = zipfile.ZIP_STORED
                archive.writestr(info, data)
    return buffer.getvalue()
