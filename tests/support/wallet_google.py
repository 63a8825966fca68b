"""Shared set-up for the Google Wallet card tests: members, settings, save-link decoding."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flask import Flask
from google.auth import crypt
from google.auth import jwt as google_jwt
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from passes.google import SAVE_URL_PREFIX
from passes.google_dev import create_dev_service_account
from portal import create_app
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import load_program
from portal.services.accounts import create_customer
from portal.services.consent import Proof
from portal.services.wallet_google import GoogleSettings
from portal.wallet_sync import close_google_client
from tests.conftest import CATALOG, app_config
from tests.support.fake_google import FakeGoogle

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
ISSUER = "3388000000022233344"
_numbers = count()


def settings(key_file: Path | None, api_url: str = "http://127.0.0.1:9/walletobjects/v1",
             base_url: str = "https://carnet.example") -> GoogleSettings:
    return GoogleSettings(issuer_id=ISSUER, class_suffix="carnet-rewards",
                          issuer_name="Carnet", service_account_file=str(key_file) if key_file
                          else None, api_url=api_url, origins=(base_url,), base_url=base_url)


def new_member(session: Session, *, locale: str = "en", email: str | None = None) -> Member:
    customer = create_customer(session, email or f"card{next(_numbers)}@example.com",
                               source="import")
    customer.locale = locale
    return ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version,
                         Proof("import", "test"))


def earn(session: Session, member: Member, points: int) -> None:
    ledger.earn(session, PROGRAM, member, points, reason=f"Order {points}", actor="store:test")
    session.flush()


def public_pem(key_file: Path) -> bytes:
    info = json.loads(key_file.read_text())
    key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def decode_save_link(url: str, key_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a save link, the RS256 signature checked with the key's public
    half, and the key id checked against the key file."""
    assert url.startswith(SAVE_URL_PREFIX), url
    token = url[len(SAVE_URL_PREFIX):]
    header = google_jwt.decode_header(token)
    # google.auth.jwt.decode insists on ``exp``, which save links do not carry: check the
    # signature with the verifier directly, then read the claims.
    signed, _, signature = token.encode("ascii").rpartition(b".")
    verifier = crypt.RSAVerifier.from_string(public_pem(key_file))
    raw_signature = base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4))
    assert verifier.verify(signed, raw_signature), "save link signature does not verify"
    claims = google_jwt.decode(token, verify=False)
    info = json.loads(key_file.read_text())
    signer = crypt.RSASigner.from_service_account_info(info)
    assert header["alg"] == "RS256" and header["kid"] == signer.key_id
    return header, claims


@pytest.fixture(name="google")
def google_fake() -> Iterator[FakeGoogle]:
    """A real local HTTP server standing in for Google's token endpoint and REST API."""
    with FakeGoogle() as fake:
        yield fake


@pytest.fixture(name="app")
def google_app(connection: Connection, tmp_path: Path, google: FakeGoogle
               ) -> Iterator[Flask]:
    """The app with a development service account that the stand-in Google trusts."""
    key = create_dev_service_account(tmp_path / "google" / "sa.json",
                                     token_uri=google.token_uri)
    google.trust_service_account(key)
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection,
                                GOOGLE_SERVICE_ACCOUNT_FILE=str(key),
                                GOOGLE_WALLET_API_URL=google.base_url,
                                BASE_URL="https://carnet.example"))
    yield app
    close_google_client(app)
