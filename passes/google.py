"""Google Wallet loyalty cards as plain data: class and object bodies, save links, quotas.

This module knows nothing of Flask or the database. It takes frozen dataclasses and a
service-account dictionary and returns the JSON bodies the Google Wallet REST API expects
and the signed "Add to Google Wallet" link. Everything is validated before it leaves the
process, because Google answers a malformed save link with a blank page on the member's
phone rather than with an error we could log.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from google.auth import crypt
from google.auth import jwt as google_jwt

SAVE_URL_PREFIX = "https://pay.google.com/gp/v/save/"
SAVE_AUDIENCE = "google"
SAVE_TYPE = "savetowallet"
NOTIFY_ON_UPDATE = "NOTIFY_ON_UPDATE"

#: Google's object and class states a Carnet card can be in.
OBJECT_STATES = frozenset({"ACTIVE", "COMPLETED", "EXPIRED", "INACTIVE"})
#: The review statuses Google accepts when a class is inserted or updated by an issuer.
CLASS_REVIEW_STATUSES = frozenset({"DRAFT", "UNDER_REVIEW"})
#: LoyaltyPointsBalance.int is a 32-bit signed integer on Google's side.
MAX_POINTS = 2**31 - 1

_ISSUER_ID = re.compile(r"[0-9]+")
# Google documents identifiers as "alphanumeric characters, '.', '_' or '-'"; ASCII only,
# because Python's \w would also let through letters Google rejects.
_ID_SUFFIX = re.compile(r"[A-Za-z0-9_.-]+")
_RESOURCE_ID = re.compile(r"[0-9]+\.[A-Za-z0-9_.-]+")
_HEX_COLOUR = re.compile(r"#(?:[0-9A-Fa-f]{3}|[0-9A-Fa-f]{6})")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

#: Card labels in every language Carnet ships. They live here rather than in the gettext
#: catalogues because Google wants all translations in one body, not the request's language.
LABELS: Mapping[str, Mapping[str, str]] = {
    "points": {"en": "Points", "fr": "Points"},
    "tier": {"en": "Tier", "fr": "Niveau"},
    "next_tier": {"en": "Next tier", "fr": "Prochain niveau"},
    "manage_preferences": {"en": "Manage my preferences", "fr": "Gérer mes préférences"},
    "member_number": {"en": "Member number", "fr": "Numéro de membre"},
    "member_name": {"en": "Member", "fr": "Membre"},
}
DEFAULT_LANGUAGE = "en"


class GoogleWalletValidationError(ValueError):
    """A card, message or save link would be refused or mis-rendered by Google."""


@dataclass(frozen=True)
class LoyaltyProgram:
    """The program as Google shows it on every card: one LoyaltyClass per program.

    ``localized_program_name`` maps a language tag (``en``, ``fr``) to the program name
    in that language; ``program_name`` is what Google shows when none matches.
    """

    issuer_id: str
    class_suffix: str
    issuer_name: str
    program_name: str
    program_logo_uri: str
    hex_background_color: str
    localized_program_name: Mapping[str, str] = field(default_factory=dict)
    review_status: str = "UNDER_REVIEW"

    @property
    def class_id(self) -> str:
        """Google's class id, ``<issuer id>.<class suffix>``."""
        return f"{self.issuer_id}.{self.class_suffix}"


@dataclass(frozen=True)
class LoyaltyMember:
    """What one member's card shows: the member's own data, already computed.

    ``next_tier_text`` is the sentence shown in the card details (empty at the top tier);
    ``locale`` is the member's language (``fr``, ``fr_CA`` or ``fr-CA``) and decides the
    default value of every localized label.
    """

    member_number: str
    account_name: str
    points: int
    tier_name: str
    next_tier_text: str
    manage_preferences_url: str
    locale: str = DEFAULT_LANGUAGE


# --------------------------------------------------------------------------- validation


def _require_text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GoogleWalletValidationError(f"{name} is required and must be non-empty text")
    return value


def _require_web_uri(value: object, name: str) -> None:
    parts = urlsplit(_require_text(value, name))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GoogleWalletValidationError(f"{name} must be an absolute http(s) URI, got {value!r}")


def _validate_issuer_id(issuer_id: object) -> None:
    if not isinstance(issuer_id, str) or not _ISSUER_ID.fullmatch(issuer_id):
        raise GoogleWalletValidationError(
            f"issuer_id must be the digits Google assigned to the issuer, got {issuer_id!r}"
        )


def _validate_language(tag: object, name: str) -> None:
    if not isinstance(tag, str) or not _LANGUAGE_TAG.fullmatch(tag.replace("_", "-")):
        raise GoogleWalletValidationError(
            f"{name} must be a language tag such as 'en' or 'fr-CA', got {tag!r}"
        )


def validate_program(program: LoyaltyProgram) -> None:
    """Refuse a program Google would reject, naming the offending field."""
    _validate_issuer_id(program.issuer_id)
    if not _ID_SUFFIX.fullmatch(program.class_suffix or ""):
        raise GoogleWalletValidationError(
            "class_suffix may only contain ASCII letters, digits, '.', '_' and '-', "
            f"got {program.class_suffix!r}"
        )
    _require_text(program.issuer_name, "issuer_name")
    _require_text(program.program_name, "program_name")
    _require_web_uri(program.program_logo_uri, "program_logo_uri")
    if not isinstance(program.hex_background_color, str) or not _HEX_COLOUR.fullmatch(
        program.hex_background_color
    ):
        raise GoogleWalletValidationError(
            "hex_background_color must look like '#rrggbb' or '#rgb', "
            f"got {program.hex_background_color!r}"
        )
    for language, name in program.localized_program_name.items():
        _validate_language(language, "localized_program_name language")
        _require_text(name, f"localized_program_name[{language!r}]")
    if program.review_status not in CLASS_REVIEW_STATUSES:
        raise GoogleWalletValidationError(
            f"review_status must be one of {sorted(CLASS_REVIEW_STATUSES)}, "
            f"got {program.review_status!r}"
        )


def validate_member(member: LoyaltyMember) -> None:
    """Refuse member data that would make a broken card, naming the offending field."""
    _require_text(member.member_number, "member_number")
    _require_text(member.account_name, "account_name")
    if isinstance(member.points, bool) or not isinstance(member.points, int):
        raise GoogleWalletValidationError(
            f"points must be an integer, got {type(member.points).__name__}"
        )
    if member.points < 0:
        raise GoogleWalletValidationError(f"points must not be negative, got {member.points}")
    if member.points > MAX_POINTS:
        raise GoogleWalletValidationError(
            f"points must fit Google's 32-bit balance (at most {MAX_POINTS}), got {member.points}"
        )
    _require_text(member.tier_name, "tier_name")
    if not isinstance(member.next_tier_text, str):
        raise GoogleWalletValidationError("next_tier_text must be text (empty at the top tier)")
    _require_web_uri(member.manage_preferences_url, "manage_preferences_url")
    _validate_language(member.locale, "locale")


def _validate_origin(origin: object) -> None:
    if not isinstance(origin, str):
        raise GoogleWalletValidationError(f"origins must be strings, got {origin!r}")
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GoogleWalletValidationError(
            f"origin {origin!r} must be scheme://host[:port] with http or https"
        )
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise GoogleWalletValidationError(
            f"origin {origin!r} must be an origin (scheme://host[:port]), "
            "without path, query, fragment or credentials"
        )


def _validate_resource_id(value: object, name: str) -> None:
    if not isinstance(value, str) or not _RESOURCE_ID.fullmatch(value):
        raise GoogleWalletValidationError(
            f"{name} must be '<issuer id digits>.<suffix of [A-Za-z0-9_.-]>', got {value!r}"
        )


def validate_save_claims(claims: Mapping[str, Any]) -> None:
    """Check a save-link claim set the way Google would, before we spend a signature on it."""
    iss = claims.get("iss")
    if not isinstance(iss, str) or not _EMAIL.fullmatch(iss):
        raise GoogleWalletValidationError(
            f"iss must be the service account's email address, got {iss!r}"
        )
    if claims.get("aud") != SAVE_AUDIENCE:
        raise GoogleWalletValidationError(
            f"aud must be {SAVE_AUDIENCE!r}, got {claims.get('aud')!r}"
        )
    if claims.get("typ") != SAVE_TYPE:
        raise GoogleWalletValidationError(f"typ must be {SAVE_TYPE!r}, got {claims.get('typ')!r}")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int) or iat <= 0:
        raise GoogleWalletValidationError(
            f"iat must be a positive integer of seconds since the epoch, got {iat!r}"
        )
    origins = claims.get("origins")
    if not isinstance(origins, list) or not origins:
        raise GoogleWalletValidationError(
            "origins must be a non-empty list: without it Google does not render the button"
        )
    for origin in origins:
        _validate_origin(origin)
    payload = claims.get("payload")
    if not isinstance(payload, Mapping):
        raise GoogleWalletValidationError("payload must be an object")
    objects = payload.get("loyaltyObjects")
    if not isinstance(objects, list) or not objects:
        raise GoogleWalletValidationError("payload.loyaltyObjects must be a non-empty list")
    for index, obj in enumerate(objects):
        if not isinstance(obj, Mapping):
            raise GoogleWalletValidationError(f"payload.loyaltyObjects[{index}] must be an object")
        _validate_resource_id(obj.get("id"), f"payload.loyaltyObjects[{index}].id")
        _validate_resource_id(obj.get("classId"), f"payload.loyaltyObjects[{index}].classId")
    for index, cls in enumerate(payload.get("loyaltyClasses", [])):
        if not isinstance(cls, Mapping):
            raise GoogleWalletValidationError(f"payload.loyaltyClasses[{index}] must be an object")
        _validate_resource_id(cls.get("id"), f"payload.loyaltyClasses[{index}].id")


# --------------------------------------------------------------------------- building


def _language_of(locale: str) -> str:
    """BCP 47 tag Google expects (``fr-CA``), from a Babel locale (``fr_CA``)."""
    return locale.replace("_", "-")


def localized_string(
    translations: Mapping[str, str], default_language: str = DEFAULT_LANGUAGE
) -> dict[str, Any]:
    """Google's LocalizedString: every translation, defaulting to the member's language.

    The default matters: Google shows it when the phone's language matches none of the
    translated values, so it should be the language the member chose in Carnet.
    """
    if not translations:
        raise GoogleWalletValidationError("a localized string needs at least one translation")
    tag = _language_of(default_language)
    for candidate in (tag, tag.split("-")[0].lower(), DEFAULT_LANGUAGE):
        if candidate in translations:
            default_tag, default_value = candidate, translations[candidate]
            break
    else:
        default_tag, default_value = next(iter(translations.items()))
    return {
        "defaultValue": {"language": default_tag, "value": default_value},
        "translatedValues": [
            {"language": language, "value": value}
            for language, value in sorted(translations.items())
        ],
    }


def _label(key: str, locale: str) -> tuple[str, dict[str, Any]]:
    """A plain label in the member's language and its LocalizedString."""
    localized = localized_string(LABELS[key], locale)
    return localized["defaultValue"]["value"], localized


def object_id_for(issuer_id: str, member_number: str) -> str:
    """Google object id of a member's card: stable, so a card once saved stays the same card.

    Member numbers that already fit Google's charset are used as they are; any other
    character becomes ``-`` and a short digest of the original number is appended, so two
    numbers that differ only in such characters cannot collide.
    """
    _validate_issuer_id(issuer_id)
    _require_text(member_number, "member_number")
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", member_number)
    if cleaned != member_number:
        digest = hashlib.sha256(member_number.encode("utf-8")).hexdigest()[:10]
        cleaned = f"{cleaned}-{digest}"
    return f"{issuer_id}.member-{cleaned}"


def build_loyalty_class(program: LoyaltyProgram) -> dict[str, Any]:
    """The LoyaltyClass body: what every member's card of this program shares."""
    validate_program(program)
    names = dict(program.localized_program_name) or {DEFAULT_LANGUAGE: program.program_name}
    body: dict[str, Any] = {
        "id": program.class_id,
        "issuerName": program.issuer_name,
        "programName": program.program_name,
        "localizedProgramName": localized_string(names),
        "programLogo": {
            "sourceUri": {"uri": program.program_logo_uri},
            "contentDescription": localized_string(names),
        },
        "hexBackgroundColor": program.hex_background_color,
        "reviewStatus": program.review_status,
        "accountIdLabel": LABELS["member_number"][DEFAULT_LANGUAGE],
        "localizedAccountIdLabel": localized_string(LABELS["member_number"]),
        "accountNameLabel": LABELS["member_name"][DEFAULT_LANGUAGE],
        "localizedAccountNameLabel": localized_string(LABELS["member_name"]),
    }
    return body


def _points_fields(member: LoyaltyMember) -> dict[str, Any]:
    """The fields that change when points or tier change: shared by insert and PATCH."""
    points_label, points_localized = _label("points", member.locale)
    tier_label, tier_localized = _label("tier", member.locale)
    fields: dict[str, Any] = {
        "loyaltyPoints": {
            "label": points_label,
            "localizedLabel": points_localized,
            "balance": {"int": member.points},
        },
        # LoyaltyObject has no rewardsTier (that is a class field, the same for every
        # member), so the member's own tier is shown as a secondary balance.
        "secondaryLoyaltyPoints": {
            "label": tier_label,
            "localizedLabel": tier_localized,
            "balance": {"string": member.tier_name},
        },
        "textModulesData": [],
    }
    if member.next_tier_text.strip():
        header, header_localized = _label("next_tier", member.locale)
        fields["textModulesData"] = [
            {
                "id": "next_tier",
                "header": header,
                "localizedHeader": header_localized,
                "body": member.next_tier_text,
            }
        ]
    return fields


def build_loyalty_object(
    program: LoyaltyProgram, member: LoyaltyMember, state: str = "ACTIVE"
) -> dict[str, Any]:
    """The LoyaltyObject body for one member's card."""
    validate_program(program)
    validate_member(member)
    if state not in OBJECT_STATES:
        raise GoogleWalletValidationError(
            f"state must be one of {sorted(OBJECT_STATES)}, got {state!r}"
        )
    link_text, link_localized = _label("manage_preferences", member.locale)
    body: dict[str, Any] = {
        "id": object_id_for(program.issuer_id, member.member_number),
        "classId": program.class_id,
        "state": state,
        "accountId": member.member_number,
        "accountName": member.account_name,
        **_points_fields(member),
        "barcode": {
            "type": "QR_CODE",
            "value": member.member_number,
            "alternateText": member.member_number,
        },
        "linksModuleData": {
            "uris": [
                {
                    "id": "manage_preferences",
                    "uri": member.manage_preferences_url,
                    "description": link_text,
                    "localizedDescription": link_localized,
                }
            ]
        },
    }
    if not body["textModulesData"]:
        del body["textModulesData"]
    return body


def build_points_patch(member: LoyaltyMember, *, notify: bool = True) -> dict[str, Any]:
    """PATCH body for a points or tier change.

    ``notify`` asks Google to tell the member (``notifyPreference: NOTIFY_ON_UPDATE``);
    pass ``False`` when :func:`notifications_allowed` says the pass's quota is spent, so
    the card still updates silently. ``textModulesData`` is always sent, empty at the top
    tier, because PATCH replaces lists and a stale "next tier" line would otherwise stay.
    """
    validate_member(member)
    body = _points_fields(member)
    if notify:
        body["notifyPreference"] = NOTIFY_ON_UPDATE
    return body


def build_message(
    header: str,
    body: str,
    message_id: str,
    translations: Mapping[str, tuple[str, str]] | None = None,
    *,
    default_language: str = DEFAULT_LANGUAGE,
    notify: bool = True,
) -> dict[str, Any]:
    """A Message for ``addMessage``; ``translations`` maps language to (header, body).

    ``notify`` makes it ``TEXT_AND_NOTIFY`` (a phone notification, which counts towards
    the per-pass quota); ``False`` makes it ``TEXT``, shown only in the card details.
    """
    _require_text(header, "message header")
    _require_text(body, "message body")
    _require_text(message_id, "message id")
    _validate_language(default_language, "default_language")
    message: dict[str, Any] = {
        "id": message_id,
        "header": header,
        "body": body,
        "messageType": "TEXT_AND_NOTIFY" if notify else "TEXT",
    }
    if translations:
        headers: dict[str, str] = {}
        bodies: dict[str, str] = {}
        for language, (translated_header, translated_body) in translations.items():
            _validate_language(language, "message translation language")
            _require_text(translated_header, f"message header [{language!r}]")
            _require_text(translated_body, f"message body [{language!r}]")
            headers[_language_of(language)] = translated_header
            bodies[_language_of(language)] = translated_body
        message["localizedHeader"] = localized_string(headers, default_language)
        message["localizedBody"] = localized_string(bodies, default_language)
    return message


def notifications_allowed(
    sent_times: Iterable[datetime],
    now: datetime,
    limit: int = 3,
    window: timedelta = timedelta(hours=24),
) -> bool:
    """Whether one more notifying update fits Google's per-pass quota.

    Google delivers at most ``limit`` notifications per pass in a sliding ``window``; past
    that it drops them silently, so we count ourselves. Times after ``now`` (clock skew
    between workers) still count: erring towards silence is cheaper than a lost message.
    """
    start = now - window
    recent = sum(1 for sent in sent_times if sent > start)
    return recent < limit


# --------------------------------------------------------------------------- save links


def build_save_jwt_claims(
    service_account_email: str,
    origins: Sequence[str],
    loyalty_object: Mapping[str, Any],
    loyalty_class: Mapping[str, Any] | None = None,
    *,
    issued_at: int | None = None,
) -> dict[str, Any]:
    """Claims of an "Add to Google Wallet" link for one card.

    Including the class lets the link work before the class was inserted over REST, at
    the cost of a longer URL. ``iat`` is set here because ``google.auth.jwt.encode``
    does not add it and Google requires it.
    """
    payload: dict[str, Any] = {"loyaltyObjects": [dict(loyalty_object)]}
    if loyalty_class is not None:
        payload["loyaltyClasses"] = [dict(loyalty_class)]
    claims: dict[str, Any] = {
        "iss": service_account_email,
        "aud": SAVE_AUDIENCE,
        "typ": SAVE_TYPE,
        "iat": int(time.time()) if issued_at is None else issued_at,
        "origins": list(origins),
        "payload": payload,
    }
    validate_save_claims(claims)
    return claims


def sign_save_link(service_account_info: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """Sign ``claims`` (RS256) with the service account's key and return the save URL.

    The claims must name the same service account that signs them: Google checks the
    signature against the public key of ``iss``.
    """
    validate_save_claims(claims)
    email = service_account_info.get("client_email")
    if claims["iss"] != email:
        raise GoogleWalletValidationError(
            f"iss {claims['iss']!r} is not the signing service account {email!r}"
        )
    if not service_account_info.get("private_key"):
        raise GoogleWalletValidationError("service account has no private_key")
    signer = crypt.RSASigner.from_service_account_info(service_account_info)
    token: bytes = google_jwt.encode(signer, dict(claims))
    return SAVE_URL_PREFIX + token.decode("ascii")
