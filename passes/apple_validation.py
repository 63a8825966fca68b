"""Checks a pass must pass before it is signed, each failing with the field at fault.

A pass that fails these would be refused silently by the phone; failing here names the
problem instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from passes.images import (
    ICON_POINTS,
    LOGO_MAX_POINTS,
    SCALES,
    STRIP_MAX_POINTS,
    png_size,
    scaled_name,
)

_REQUIRED_TOP_LEVEL: Final = (
    "passTypeIdentifier",
    "serialNumber",
    "teamIdentifier",
    "organizationName",
    "description",
)
_FIELD_GROUPS: Final = (
    "headerFields",
    "primaryFields",
    "secondaryFields",
    "auxiliaryFields",
    "backFields",
)
_COLOUR_KEYS: Final = ("foregroundColor", "backgroundColor", "labelColor")
_RGB_RE: Final = re.compile(r"^rgb\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)$")
_HEX_RE: Final = re.compile(r"^#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
_MIN_TOKEN_LENGTH: Final = 16


class PassValidationError(ValueError):
    """The pass would be rejected or shown wrong by Wallet; ``field`` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def parse_colour(value: str, field_name: str) -> tuple[int, int, int]:
    """Parse ``rgb(r, g, b)``, ``#rrggbb`` or ``#rgb``; raise naming ``field_name`` if not."""
    text = value.strip()
    if match := _RGB_RE.match(text):
        channels = tuple(int(part) for part in match.groups())
        if any(channel > 255 for channel in channels):
            raise PassValidationError(field_name, f"channel above 255 in {value!r}")
        return channels[0], channels[1], channels[2]
    if match := _HEX_RE.match(text):
        digits = match.group(1)
        if len(digits) == 3:
            digits = "".join(ch * 2 for ch in digits)
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
    raise PassValidationError(field_name, f"expected 'rgb(r, g, b)' or '#rrggbb', got {value!r}")


def _fields(document: Mapping[str, Any]) -> Iterable[tuple[str, int, Mapping[str, Any]]]:
    style = document.get("storeCard")
    if not isinstance(style, Mapping):
        return
    for group in _FIELD_GROUPS:
        entries = style.get(group, [])
        if not isinstance(entries, list):
            raise PassValidationError(f"storeCard.{group}", "must be a list of fields")
        for index, entry in enumerate(entries):
            yield group, index, entry


def validate_pass_json(document: Mapping[str, Any], *, allow_http: bool = False) -> None:
    """Check ``document`` against what Wallet requires; raise on the first problem.

    ``allow_http`` accepts an ``http://`` web service, which only devices with the
    developer setting "Allow HTTP Services" will talk to.
    """
    if document.get("formatVersion") != 1:
        raise PassValidationError("formatVersion", "must be the integer 1")
    for key in _REQUIRED_TOP_LEVEL:
        value = document.get(key)
        if not isinstance(value, str) or not value.strip():
            raise PassValidationError(key, "required, must be a non-empty string")
    if not str(document["passTypeIdentifier"]).startswith("pass."):
        raise PassValidationError("passTypeIdentifier", "must start with 'pass.'")
    if not isinstance(document.get("storeCard"), Mapping):
        raise PassValidationError("storeCard", "required style dictionary is missing")
    for colour_key in _COLOUR_KEYS:
        if colour_key not in document:
            continue
        if not _RGB_RE.match(str(document[colour_key])):
            raise PassValidationError(
                colour_key, f"expected 'rgb(r, g, b)', got {document[colour_key]!r}"
            )
        parse_colour(str(document[colour_key]), colour_key)

    seen: dict[str, str] = {}
    for group, index, entry in _fields(document):
        where = f"storeCard.{group}[{index}]"
        field_key = entry.get("key") if isinstance(entry, Mapping) else None
        if not isinstance(field_key, str) or not field_key:
            raise PassValidationError(f"{where}.key", "every field needs a non-empty key")
        if field_key in seen:
            raise PassValidationError(
                f"{where}.key",
                f"duplicate field key {field_key!r} (already used in {seen[field_key]})",
            )
        seen[field_key] = where
        if "value" not in entry or entry["value"] is None:
            raise PassValidationError(f"{where}.value", "every field needs a value")
        if entry.get("changeMessage") == "":
            raise PassValidationError(f"{where}.changeMessage", "empty; omit it instead")
        if "numberStyle" in entry and (
            isinstance(entry["value"], bool) or not isinstance(entry["value"], int | float)
        ):
            raise PassValidationError(f"{where}.value", "numberStyle needs a number value")

    barcodes = document.get("barcodes", [])
    for index, barcode in enumerate(barcodes):
        where = f"barcodes[{index}]"
        message = barcode.get("message")
        if not isinstance(message, str) or not message:
            raise PassValidationError(f"{where}.message", "must be a non-empty string")
        try:
            message.encode(barcode.get("messageEncoding", "iso-8859-1"))
        except (UnicodeEncodeError, LookupError) as exc:
            raise PassValidationError(
                f"{where}.message", f"not encodable as {barcode.get('messageEncoding')!r}"
            ) from exc

    url, token = document.get("webServiceURL"), document.get("authenticationToken")
    if url is not None or token is not None:
        if not isinstance(url, str) or not url:
            raise PassValidationError("webServiceURL", "required when authenticationToken is set")
        parts = urlsplit(url)
        allowed = ("https", "http") if allow_http else ("https",)
        if parts.scheme not in allowed or not parts.netloc:
            raise PassValidationError(
                "webServiceURL",
                f"must be an https:// URL, got {url!r}"
                + ("" if allow_http else " (http is only for development: allow_http=True)"),
            )
        if not isinstance(token, str) or len(token) < _MIN_TOKEN_LENGTH:
            raise PassValidationError(
                "authenticationToken",
                f"must be at least {_MIN_TOKEN_LENGTH} characters when webServiceURL is set",
            )


def validate_strings(
    strings: Mapping[str, Mapping[str, str]], required_keys: Iterable[str]
) -> None:
    """Check that every locale (English included) translates every key the pass uses."""
    if "en" not in strings:
        raise PassValidationError("strings", "an 'en' localisation is required")
    required = tuple(required_keys)
    for locale, table in strings.items():
        if not re.fullmatch(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*", locale):
            raise PassValidationError(f"strings[{locale!r}]", "not a language identifier")
        for key in required:
            value = table.get(key)
            if not value:
                raise PassValidationError(f"strings[{locale!r}][{key!r}]", "missing translation")
            if key.endswith(".changeMessage") and "%@" not in value:
                raise PassValidationError(
                    f"strings[{locale!r}][{key!r}]", "a change message must contain '%@'"
                )


def validate_images(files: Mapping[str, bytes]) -> None:
    """Check presence, PNG-ness and Apple's pixel sizes for every image of the pass."""
    limits: dict[str, tuple[tuple[int, int], bool]] = {
        "icon": (ICON_POINTS, True),
        "logo": (LOGO_MAX_POINTS, False),
        "strip": (STRIP_MAX_POINTS, False),
    }
    for stem in ("icon", "logo"):
        for scale in SCALES:
            name = scaled_name(stem, scale)
            if name not in files:
                raise PassValidationError(f"images[{name!r}]", "required image is missing")
    known = {scaled_name(stem, scale): (stem, scale) for stem in limits for scale in SCALES}
    for name, data in files.items():
        if name not in known:
            raise PassValidationError(f"images[{name!r}]", "not an image a store card uses")
        stem, scale = known[name]
        try:
            width, height = png_size(data)
        except ValueError as exc:
            raise PassValidationError(f"images[{name!r}]", str(exc)) from exc
        (max_w, max_h), exact = limits[stem]
        max_w, max_h = max_w * scale, max_h * scale
        if exact and (width, height) != (max_w, max_h):
            raise PassValidationError(
                f"images[{name!r}]", f"must be {max_w}×{max_h} px, got {width}×{height}"
            )
        if width > max_w or height > max_h:
            raise PassValidationError(
                f"images[{name!r}]", f"must fit in {max_w}×{max_h} px, got {width}×{height}"
            )
