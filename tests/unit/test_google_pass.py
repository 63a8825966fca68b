"""Google Wallet cards and save links, checked the way Google and a phone would see them."""

from __future__ import annotations

import base64
import json
import re
import stat
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from google.auth import crypt
from google.oauth2 import service_account

from passes.google import (
    SAVE_URL_PREFIX,
    GoogleWalletValidationError,
    LoyaltyMember,
    LoyaltyProgram,
    build_loyalty_class,
    build_loyalty_object,
    build_message,
    build_points_patch,
    build_save_jwt_claims,
    notifications_allowed,
    object_id_for,
    sign_save_link,
)
from passes.google_dev import create_dev_service_account

GOOGLE_ID = re.compile(r"[0-9]+\.[A-Za-z0-9_.-]+")
ORIGINS = ["https://carnet.example", "http://localhost:5000"]


@pytest.fixture
def program() -> LoyaltyProgram:
    return LoyaltyProgram(
        issuer_id="3388000000022212345",
        class_suffix="carnet-rewards",
        issuer_name="Carnet",
        program_name="Carnet Rewards",
        program_logo_uri="https://carnet.example/static/img/logo.png",
        hex_background_color="#1f3a5f",
        localized_program_name={"en": "Carnet Rewards", "fr": "Récompenses Carnet"},
    )


@pytest.fixture
def member() -> LoyaltyMember:
    return LoyaltyMember(
        member_number="CN-000123",
        account_name="Léa Martin",
        points=1250,
        tier_name="Gold",
        next_tier_text="750 points to Platinum",
        manage_preferences_url="https://carnet.example/preferences",
        locale="en",
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return create_dev_service_account(
        tmp_path / "google-sa.json", token_uri="https://oauth2.googleapis.com/token"
    )


@pytest.fixture
def key_info(key_file: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(key_file.read_text(encoding="utf-8"))
    return info


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _public_pem(info: dict[str, Any]) -> bytes:
    private_key = serialization.load_pem_private_key(info["private_key"].encode(), None)
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- save link


def test_save_link_is_signed_by_the_service_account_and_carries_the_member_card(
    program: LoyaltyProgram, member: LoyaltyMember, key_info: dict[str, Any]
) -> None:
    before = int(time.time())
    claims = build_save_jwt_claims(
        key_info["client_email"],
        ORIGINS,
        build_loyalty_object(program, member),
        build_loyalty_class(program),
    )
    link = sign_save_link(key_info, claims)
    after = int(time.time())

    assert link.startswith("https://pay.google.com/gp/v/save/")
    token = link[len(SAVE_URL_PREFIX) :]
    header_b64, payload_b64, signature_b64 = token.split(".")

    header = json.loads(_b64decode(header_b64))
    assert header["alg"] == "RS256"
    assert header["kid"] == key_info["private_key_id"]

    signed = f"{header_b64}.{payload_b64}".encode("ascii")
    signature = _b64decode(signature_b64)
    assert crypt.verify_signature(signed, signature, _public_pem(key_info))
    # The check is meaningful: a changed payload does not verify.
    assert not crypt.verify_signature(signed + b"x", signature, _public_pem(key_info))

    decoded = json.loads(_b64decode(payload_b64))
    assert decoded["iss"] == key_info["client_email"]
    assert decoded["aud"] == "google"
    assert decoded["typ"] == "savetowallet"
    assert isinstance(decoded["iat"], int) and before <= decoded["iat"] <= after
    assert decoded["origins"] == ORIGINS

    (card,) = decoded["payload"]["loyaltyObjects"]
    assert GOOGLE_ID.fullmatch(card["id"])
    assert card["id"] == object_id_for(program.issuer_id, member.member_number)
    assert card["classId"] == "3388000000022212345.carnet-rewards"
    assert card["state"] == "ACTIVE"
    assert card["accountId"] == "CN-000123"
    assert card["accountName"] == "Léa Martin"
    assert card["loyaltyPoints"]["balance"] == {"int": 1250}
    assert card["loyaltyPoints"]["label"] == "Points"
    assert card["secondaryLoyaltyPoints"]["balance"] == {"string": "Gold"}
    assert card["barcode"] == {
        "type": "QR_CODE",
        "value": "CN-000123",
        "alternateText": "CN-000123",
    }
    assert card["textModulesData"][0]["body"] == "750 points to Platinum"
    (link_module,) = card["linksModuleData"]["uris"]
    assert link_module["uri"] == "https://carnet.example/preferences"

    (card_class,) = decoded["payload"]["loyaltyClasses"]
    assert card_class["id"] == card["classId"]
    assert card_class["programLogo"]["sourceUri"]["uri"] == program.program_logo_uri
    assert card_class["reviewStatus"] == "UNDER_REVIEW"


def test_a_link_signed_with_another_key_does_not_verify(
    tmp_path: Path, program: LoyaltyProgram, member: LoyaltyMember, key_info: dict[str, Any]
) -> None:
    other_file = create_dev_service_account(tmp_path / "other.json", token_uri="https://t.example")
    other = json.loads(other_file.read_text(encoding="utf-8"))
    claims = build_save_jwt_claims(
        other["client_email"], ORIGINS, build_loyalty_object(program, member)
    )
    header_b64, payload_b64, signature_b64 = sign_save_link(other, claims)[
        len(SAVE_URL_PREFIX) :
    ].split(".")
    signed = f"{header_b64}.{payload_b64}".encode("ascii")
    assert crypt.verify_signature(signed, _b64decode(signature_b64), _public_pem(other))
    assert not crypt.verify_signature(signed, _b64decode(signature_b64), _public_pem(key_info))


def test_french_member_sees_french_labels_by_default(
    program: LoyaltyProgram, member: LoyaltyMember
) -> None:
    card = build_loyalty_object(program, replace(member, locale="fr_CA"))
    tier = card["secondaryLoyaltyPoints"]
    assert tier["label"] == "Niveau"
    assert tier["localizedLabel"]["defaultValue"] == {"language": "fr", "value": "Niveau"}
    assert {"language": "en", "value": "Tier"} in tier["localizedLabel"]["translatedValues"]
    link = card["linksModuleData"]["uris"][0]
    assert link["description"] == "Gérer mes préférences"
    names = build_loyalty_class(program)["localizedProgramName"]["translatedValues"]
    assert {"language": "fr", "value": "Récompenses Carnet"} in names


def test_top_tier_card_has_no_next_tier_line(
    program: LoyaltyProgram, member: LoyaltyMember
) -> None:
    card = build_loyalty_object(program, replace(member, next_tier_text=""))
    assert "textModulesData" not in card


def test_sign_refuses_claims_naming_another_service_account(
    program: LoyaltyProgram, member: LoyaltyMember, key_info: dict[str, Any]
) -> None:
    claims = build_save_jwt_claims(
        "someone-else@carnet-dev.iam.gserviceaccount.com",
        ORIGINS,
        build_loyalty_object(program, member),
    )
    with pytest.raises(GoogleWalletValidationError, match="is not the signing service account"):
        sign_save_link(key_info, claims)


# --------------------------------------------------------------------------- ids


def test_object_id_keeps_clean_member_numbers() -> None:
    assert object_id_for("3388", "CN-000123") == "3388.member-CN-000123"


def test_object_id_sanitises_without_collisions() -> None:
    spaced = object_id_for("3388", "CN 000/123")
    dashed = object_id_for("3388", "CN-000-123")
    accented = object_id_for("3388", "CNé000")
    for object_id in (spaced, dashed, accented):
        assert GOOGLE_ID.fullmatch(object_id), object_id
    assert spaced != dashed
    assert object_id_for("3388", "CN 000/123") == spaced  # stable across calls


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"issuer_id": "33x8"}, "issuer_id must be the digits"),
        ({"issuer_id": ""}, "issuer_id must be the digits"),
        ({"class_suffix": "rewards card"}, "class_suffix may only contain"),
        ({"class_suffix": "récompenses"}, "class_suffix may only contain"),
        ({"issuer_name": " "}, "issuer_name is required"),
        ({"program_name": ""}, "program_name is required"),
        ({"program_logo_uri": "ftp://carnet.example/logo.png"}, "program_logo_uri must be an"),
        ({"program_logo_uri": "/static/logo.png"}, "program_logo_uri must be an"),
        ({"hex_background_color": "1f3a5f"}, "hex_background_color must look like"),
        ({"hex_background_color": "#1f3a5g"}, "hex_background_color must look like"),
        ({"localized_program_name": {"fr": ""}}, r"localized_program_name\['fr'\] is required"),
        ({"localized_program_name": {"f r": "x"}}, "must be a language tag"),
        ({"review_status": "APPROVED"}, "review_status must be one of"),
    ],
)
def test_program_validation(program: LoyaltyProgram, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(GoogleWalletValidationError, match=message):
        build_loyalty_class(replace(program, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"member_number": ""}, "member_number is required"),
        ({"account_name": "  "}, "account_name is required"),
        ({"points": -1}, "points must not be negative, got -1"),
        ({"points": 2**31}, "points must fit Google's 32-bit balance"),
        ({"points": 12.5}, "points must be an integer, got float"),
        ({"points": True}, "points must be an integer, got bool"),
        ({"tier_name": ""}, "tier_name is required"),
        ({"manage_preferences_url": "javascript:alert(1)"}, "manage_preferences_url must be"),
        ({"manage_preferences_url": "carnet.example/prefs"}, "manage_preferences_url must be"),
        ({"locale": "french!"}, "locale must be a language tag"),
    ],
)
def test_member_validation(
    program: LoyaltyProgram, member: LoyaltyMember, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(GoogleWalletValidationError, match=message):
        build_loyalty_object(program, replace(member, **changes))


def test_object_state_validation(program: LoyaltyProgram, member: LoyaltyMember) -> None:
    with pytest.raises(GoogleWalletValidationError, match="state must be one of"):
        build_loyalty_object(program, member, state="active")


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        ([], "origins must be a non-empty list"),
        (["carnet.example"], "must be scheme://host"),
        (["https://carnet.example/"], "must be an origin"),
        (["https://carnet.example/save"], "must be an origin"),
        (["https://carnet.example?x=1"], "must be an origin"),
        (["https://user@carnet.example"], "must be an origin"),
        (["ftp://carnet.example"], "must be scheme://host"),
    ],
)
def test_origins_must_be_origins(
    program: LoyaltyProgram,
    member: LoyaltyMember,
    key_info: dict[str, Any],
    origins: list[str],
    message: str,
) -> None:
    with pytest.raises(GoogleWalletValidationError, match=message):
        build_save_jwt_claims(
            key_info["client_email"], origins, build_loyalty_object(program, member)
        )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(iss="not-an-email"), "iss must be the service account's email"),
        (lambda c: c.update(aud="https://google.com"), "aud must be 'google'"),
        (lambda c: c.update(typ="jwt"), "typ must be 'savetowallet'"),
        (lambda c: c.pop("iat"), "iat must be a positive integer"),
        (lambda c: c.update(iat="now"), "iat must be a positive integer"),
        (lambda c: c["payload"].update(loyaltyObjects=[]), "loyaltyObjects must be a non-empty"),
        (
            lambda c: c["payload"]["loyaltyObjects"][0].update(id="3388.member CN"),
            r"loyaltyObjects\[0\]\.id must be",
        ),
        (
            lambda c: c["payload"]["loyaltyObjects"][0].update(classId="carnet.rewards"),
            r"loyaltyObjects\[0\]\.classId must be",
        ),
    ],
)
def test_sign_validates_claims_before_signing(
    program: LoyaltyProgram,
    member: LoyaltyMember,
    key_info: dict[str, Any],
    mutate: Any,
    message: str,
) -> None:
    claims = build_save_jwt_claims(
        key_info["client_email"], ORIGINS, build_loyalty_object(program, member)
    )
    mutate(claims)
    with pytest.raises(GoogleWalletValidationError, match=message):
        sign_save_link(key_info, claims)


# --------------------------------------------------------------------------- updates


def test_points_patch_notifies_with_new_balance_and_tier(member: LoyaltyMember) -> None:
    patch = build_points_patch(replace(member, points=2100, tier_name="Platinum"))
    assert patch["notifyPreference"] == "NOTIFY_ON_UPDATE"
    assert patch["loyaltyPoints"]["balance"] == {"int": 2100}
    assert patch["secondaryLoyaltyPoints"]["balance"] == {"string": "Platinum"}
    assert patch["textModulesData"][0]["body"] == "750 points to Platinum"
    assert "id" not in patch and "classId" not in patch


def test_silent_points_patch_clears_the_next_tier_line(member: LoyaltyMember) -> None:
    patch = build_points_patch(replace(member, next_tier_text=""), notify=False)
    assert "notifyPreference" not in patch
    assert patch["textModulesData"] == []


def test_points_patch_validates(member: LoyaltyMember) -> None:
    with pytest.raises(GoogleWalletValidationError, match="points must not be negative"):
        build_points_patch(replace(member, points=-5))


def test_message_notifies_in_every_language() -> None:
    message = build_message(
        "Welcome to Gold",
        "You reached Gold.",
        "tier-gold-CN-000123",
        {"en": ("Welcome to Gold", "You reached Gold."), "fr": ("Bienvenue", "Vous êtes Or.")},
        default_language="fr",
    )
    assert message["messageType"] == "TEXT_AND_NOTIFY"
    assert message["id"] == "tier-gold-CN-000123"
    assert message["header"] == "Welcome to Gold"
    assert message["localizedHeader"]["defaultValue"] == {"language": "fr", "value": "Bienvenue"}
    assert {"language": "fr", "value": "Vous êtes Or."} in message["localizedBody"][
        "translatedValues"
    ]
    assert build_message("h", "b", "id-1", notify=False)["messageType"] == "TEXT"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "body", "id"), "message header is required"),
        (("header", "", "id"), "message body is required"),
        (("header", "body", ""), "message id is required"),
    ],
)
def test_message_validation(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(GoogleWalletValidationError, match=message):
        build_message(*args)


def test_message_translation_validation() -> None:
    with pytest.raises(GoogleWalletValidationError, match=r"message body \['fr'\] is required"):
        build_message("h", "b", "id", {"fr": ("Titre", "")})


# --------------------------------------------------------------------------- quota


NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("hours_ago", "allowed"),
    [
        ([], True),
        ([1, 5], True),
        ([1, 5, 23.9], False),
        ([1, 5, 24], True),  # exactly a day old: out of the window
        ([1, 5, 30, 48], True),
        ([0, 0, 0], False),
        ([-0.1, 2, 3], False),  # a time slightly in the future still counts
    ],
)
def test_notifications_allowed(hours_ago: list[float], allowed: bool) -> None:
    sent = [NOW - timedelta(hours=h) for h in hours_ago]
    assert notifications_allowed(sent, NOW) is allowed


def test_notifications_allowed_custom_limit() -> None:
    sent = [NOW - timedelta(minutes=5)]
    assert notifications_allowed(sent, NOW, limit=1) is False
    assert notifications_allowed(sent, NOW, limit=1, window=timedelta(minutes=1)) is True


# --------------------------------------------------------------------------- dev key


def test_dev_service_account_loads_in_google_auth_and_is_private(key_file: Path) -> None:
    credentials = service_account.Credentials.from_service_account_file(str(key_file))
    info = json.loads(key_file.read_text(encoding="utf-8"))
    assert credentials.service_account_email == info["client_email"]
    assert info["client_email"] == "carnet-dev@carnet-dev.iam.gserviceaccount.com"
    assert info["type"] == "service_account"
    assert info["token_uri"] == "https://oauth2.googleapis.com/token"
    assert re.fullmatch(r"[0-9a-f]{40}", info["private_key_id"])
    assert re.fullmatch(r"[0-9]{21}", info["client_id"])
    key = serialization.load_pem_private_key(info["private_key"].encode(), None)
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_dev_service_account_is_never_overwritten(key_file: Path) -> None:
    original = key_file.read_bytes()
    again = create_dev_service_account(key_file, token_uri="http://127.0.0.1:1/token")
    assert again == key_file
    assert key_file.read_bytes() == original
    assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]
