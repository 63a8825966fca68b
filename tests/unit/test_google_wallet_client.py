"""The Google Wallet REST client against a local Google over real HTTP."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from google.auth import jwt as google_jwt

from passes.google import (
    LoyaltyMember,
    LoyaltyProgram,
    build_loyalty_class,
    build_loyalty_object,
    build_message,
    build_points_patch,
)
from passes.google_dev import create_dev_service_account
from portal.delivery.google_wallet import (
    GoogleWalletClient,
    GoogleWalletError,
    GoogleWalletNotFoundError,
    GoogleWalletPermanentError,
    GoogleWalletRetryableError,
    parse_retry_after,
)

try:
    from tests.support.fake_google import FakeGoogle
except ModuleNotFoundError:  # pytest run without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.fake_google import FakeGoogle

SCOPE = "https://www.googleapis.com/auth/wallet_object.issuer"

PROGRAM = LoyaltyProgram(
    issuer_id="3388000000022212345",
    class_suffix="carnet-rewards",
    issuer_name="Carnet",
    program_name="Carnet Rewards",
    program_logo_uri="https://carnet.example/static/img/logo.png",
    hex_background_color="#1f3a5f",
    localized_program_name={"en": "Carnet Rewards", "fr": "Récompenses Carnet"},
)
MEMBER = LoyaltyMember(
    member_number="CN-000123",
    account_name="Léa Martin",
    points=1250,
    tier_name="Gold",
    next_tier_text="750 points to Platinum",
    manage_preferences_url="https://carnet.example/preferences",
)


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with FakeGoogle() as fake:
        yield fake


@pytest.fixture
def key_file(tmp_path: Path, google: FakeGoogle) -> Path:
    path = create_dev_service_account(tmp_path / "google-sa.json", token_uri=google.token_uri)
    google.trust_service_account(path)
    return path


@pytest.fixture
def client(key_file: Path, google: FakeGoogle) -> Iterator[GoogleWalletClient]:
    with GoogleWalletClient(key_file, base_url=google.base_url, timeout=(2.0, 5.0)) as wallet:
        yield wallet


def _public_pem(key_file: Path) -> bytes:
    info = json.loads(key_file.read_text(encoding="utf-8"))
    private_key = serialization.load_pem_private_key(info["private_key"].encode(), None)
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _with_card(client: GoogleWalletClient) -> dict[str, Any]:
    client.ensure_class(build_loyalty_class(PROGRAM))
    return client.ensure_object(build_loyalty_object(PROGRAM, MEMBER)).resource


# --------------------------------------------------------------------------- token


def test_token_is_fetched_with_a_valid_signed_assertion(
    client: GoogleWalletClient, google: FakeGoogle, key_file: Path
) -> None:
    with pytest.raises(GoogleWalletNotFoundError):
        client.get_object("3388000000022212345.member-nobody")

    (token_request,) = google.token_requests
    assert google.token_rejections == []
    form = token_request.body
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    # Verified independently of the fake: signature with the key file's public key.
    claims = google_jwt.decode(
        form["assertion"],
        certs=_public_pem(key_file),
        audience="https://oauth2.googleapis.com/token",
    )
    assert claims["iss"] == "carnet-dev@carnet-dev.iam.gserviceaccount.com"
    assert claims["scope"] == SCOPE
    (wallet_request,) = google.wallet_requests
    assert wallet_request.bearer in google.issued_tokens


def test_token_is_reused_and_the_connection_kept_alive(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    _with_card(client)
    client.get_object("3388000000022212345.member-CN-000123")
    client.patch_object("3388000000022212345.member-CN-000123", build_points_patch(MEMBER))

    assert len(google.token_requests) == 1
    wallet = google.wallet_requests
    assert len(wallet) >= 5
    assert len({r.bearer for r in wallet}) == 1
    assert len({r.connection_id for r in google.requests}) == 1


def test_rejected_token_is_fetched_again_once(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    _with_card(client)
    google.revoke_tokens()
    card = client.get_object("3388000000022212345.member-CN-000123")
    assert card["accountId"] == "CN-000123"
    assert len(google.token_requests) == 2


def test_unknown_service_account_is_a_permanent_error(tmp_path: Path, google: FakeGoogle) -> None:
    stranger = create_dev_service_account(
        tmp_path / "stranger.json",
        token_uri=google.token_uri,
        client_email="stranger@elsewhere.iam.gserviceaccount.com",
    )
    with GoogleWalletClient(stranger, base_url=google.base_url) as wallet:
        with pytest.raises(GoogleWalletPermanentError, match="unknown service account") as info:
            wallet.get_object("3388.member-x")
    assert not info.value.retryable
    assert google.wallet_requests == []


# --------------------------------------------------------------------------- resources


def test_class_and_object_are_created_when_missing_then_left_alone(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    class_body = build_loyalty_class(PROGRAM)
    object_body = build_loyalty_object(PROGRAM, MEMBER)

    first_class = client.ensure_class(class_body)
    first_object = client.ensure_object(object_body)
    assert first_class.created and first_object.created
    assert google.classes[PROGRAM.class_id]["programName"] == "Carnet Rewards"
    assert google.objects[object_body["id"]]["loyaltyPoints"]["balance"] == {"int": 1250}
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in google.wallet_requests] == [
        ("GET", PROGRAM.class_id),
        ("POST", "loyaltyClass"),
        ("GET", object_body["id"]),
        ("POST", "loyaltyObject"),
    ]
    assert google.wallet_requests[3].body == object_body

    again = client.ensure_object(object_body)
    assert not again.created
    assert again.resource["id"] == object_body["id"]
    assert [r.method for r in google.wallet_requests[4:]] == ["GET"]


def test_ensure_tolerates_a_concurrent_insert(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    _with_card(client)
    google.fail_next(1, 404)  # our GET races with someone else's insert
    result = client.ensure_object(build_loyalty_object(PROGRAM, MEMBER))
    assert not result.created
    assert [r.method for r in google.wallet_requests[-3:]] == ["GET", "POST", "GET"]


def test_patch_sends_new_points_and_notify_preference(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    card = _with_card(client)
    richer = LoyaltyMember(**{**MEMBER.__dict__, "points": 2100, "tier_name": "Platinum"})
    updated = client.patch_object(card["id"], build_points_patch(richer, notify=False), notify=True)

    patch = google.wallet_requests[-1]
    assert patch.method == "PATCH"
    assert patch.path.endswith("/loyaltyObject/3388000000022212345.member-CN-000123")
    assert patch.body["notifyPreference"] == "NOTIFY_ON_UPDATE"
    assert patch.body["loyaltyPoints"]["balance"] == {"int": 2100}
    assert patch.headers["content-type"].startswith("application/json")
    assert updated["secondaryLoyaltyPoints"]["balance"] == {"string": "Platinum"}
    assert google.objects[card["id"]]["loyaltyPoints"]["balance"] == {"int": 2100}

    client.patch_object(card["id"], build_points_patch(richer, notify=False))
    assert "notifyPreference" not in google.wallet_requests[-1].body


def test_add_message_posts_the_message(client: GoogleWalletClient, google: FakeGoogle) -> None:
    card = _with_card(client)
    message = build_message(
        "Welcome to Gold", "You reached Gold.", "tier-gold", {"fr": ("Bienvenue", "Or !")}
    )
    answer = client.add_message(card["id"], message)

    request = google.wallet_requests[-1]
    assert request.method == "POST"
    assert request.path.endswith(f"/loyaltyObject/{card['id']}/addMessage")
    assert request.body == {"message": message}
    assert request.body["message"]["messageType"] == "TEXT_AND_NOTIFY"
    assert answer["resource"]["messages"] == [message]


# --------------------------------------------------------------------------- failures


def test_rate_limit_is_retryable_with_googles_delay(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    google.fail_next(1, 429, retry_after="7", message="Quota exceeded")
    with pytest.raises(GoogleWalletRetryableError) as info:
        client.get_object("3388000000022212345.member-CN-000123")
    assert info.value.retryable
    assert info.value.status == 429
    assert info.value.retry_after == 7.0
    assert "Quota exceeded" in str(info.value)


def test_server_error_is_retryable(client: GoogleWalletClient, google: FakeGoogle) -> None:
    _with_card(client)
    google.fail_next(2, 503)
    for _ in range(2):
        with pytest.raises(GoogleWalletRetryableError) as info:
            client.patch_object("3388000000022212345.member-CN-000123", {"accountName": "L"})
        assert info.value.status == 503
    # The third call goes through: nothing was applied by the failed ones.
    client.get_object("3388000000022212345.member-CN-000123")


def test_bad_request_is_permanent_with_googles_message(
    client: GoogleWalletClient, google: FakeGoogle
) -> None:
    google.fail_next(1, 400, message="Invalid hexBackgroundColor")
    with pytest.raises(GoogleWalletPermanentError) as info:
        client.insert_class(build_loyalty_class(PROGRAM))
    assert not info.value.retryable
    assert info.value.status == 400
    assert info.value.reason == "INVALID_ARGUMENT"
    assert "Invalid hexBackgroundColor" in info.value.message


def test_missing_object_is_not_found(client: GoogleWalletClient) -> None:
    with pytest.raises(GoogleWalletNotFoundError) as info:
        client.get_object("3388000000022212345.member-nobody")
    assert info.value.status == 404
    assert isinstance(info.value, GoogleWalletPermanentError)


def test_timeout_is_retryable(key_file: Path, google: FakeGoogle) -> None:
    with GoogleWalletClient(key_file, base_url=google.base_url, timeout=(2.0, 0.3)) as wallet:
        wallet.ensure_class(build_loyalty_class(PROGRAM))
        google.stall_next()
        try:
            with pytest.raises(GoogleWalletRetryableError, match="timed out"):
                wallet.get_class(PROGRAM.class_id)
        finally:
            google.release_stalled()


def test_unreachable_api_is_retryable(key_file: Path, google: FakeGoogle) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    dead = f"http://127.0.0.1:{dead_port}/walletobjects/v1"
    with GoogleWalletClient(key_file, base_url=dead, timeout=(2.0, 2.0)) as wallet:
        with pytest.raises(GoogleWalletRetryableError, match="connection failed"):
            wallet.get_object("3388.member-x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_errors_share_a_base(client: GoogleWalletClient) -> None:
    with pytest.raises(GoogleWalletError):
        client.get_class("3388.missing")
