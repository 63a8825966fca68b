"""Apple Wallet store cards: what a device (and ``openssl``) sees in the built ``.pkpass``."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import shutil
import stat
import subprocess
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from passes.apple import (
    DEFAULT_STRINGS,
    PKPASS_MEDIA_TYPE,
    News,
    PassCredentials,
    PassValidationError,
    StoreCard,
    build_store_card,
    load_credentials,
    render_pass_json,
    render_strings_file,
    validate_pass_json,
)
from passes.devcerts import DevCredentialsError, create_dev_apple_credentials
from passes.images import default_pass_images, png_size
from passes.qr import qr_png, qr_svg

PASS_TYPE_ID = "pass.com.example.carnet"
TEAM_ID = "ABCDE12345"
KEY_PASSWORD = "dev-only-password"

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")


@pytest.fixture(scope="module")
def dev_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return create_dev_apple_credentials(
        tmp_path_factory.mktemp("apple-creds"), PASS_TYPE_ID, TEAM_ID, password=KEY_PASSWORD
    )


@pytest.fixture(scope="module")
def credentials(dev_paths: dict[str, Path]) -> PassCredentials:
    return load_credentials(
        dev_paths["certificate"], dev_paths["private_key"], dev_paths["wwdr"], KEY_PASSWORD
    )


@pytest.fixture
def card() -> StoreCard:
    return StoreCard(
        pass_type_id=PASS_TYPE_ID,
        team_id=TEAM_ID,
        serial_number="c0ffee00-0000-4000-8000-000000000001",
        organization_name="Carnet",
        description="Carnet loyalty card",
        member_name="Zoé Martin",
        member_number="CARNET-000123",
        points=1250,
        tier="Silver",
        next_tier="450 points to Gold",
        web_service_url="https://carnet.example/wallet",
        authentication_token="0123456789abcdef0123",
        background_color="#23408f",
        terms="Points expire after 24 months.",
        manage_url="https://carnet.example/preferences",
    )


def unpack(pkpass: bytes, directory: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(pkpass)) as archive:
        assert archive.testzip() is None
        archive.extractall(directory)
        return {name: archive.read(name) for name in archive.namelist()}


def openssl_verify(directory: Path, ca_bundle: Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [
            OPENSSL,
            "smime",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(directory / "signature"),
            "-content",
            str(directory / "manifest.json"),
            "-CAfile",
            str(ca_bundle),
            "-purpose",
            "any",
            "-out",
            str(directory / "verified"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def parse_strings(data: bytes) -> dict[str, str]:
    assert data.startswith(b"\xff\xfe"), "pass.strings must start with a UTF-16LE BOM"
    text = data.decode("utf-16")
    table: dict[str, str] = {}
    for line in text.splitlines():
        match = re.fullmatch(r'"((?:[^"\\]|\\.)*)" = "((?:[^"\\]|\\.)*)";', line)
        assert match, f"malformed pass.strings line: {line!r}"
        key, value = (
            json.loads(f'"{part}"') for part in match.groups()
        )  # same escapes as JSON for \" \\ \n \t \r
        table[key] = value
    return table


def all_fields(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    style = document["storeCard"]
    return [f for group in style.values() for f in group]


# -- the archive and its signature -------------------------------------------------------


def test_every_file_is_listed_in_the_manifest_with_its_sha1(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    files = unpack(build_store_card(card, credentials), tmp_path)
    manifest = json.loads(files["manifest.json"])

    assert set(files) == {
        "pass.json",
        "manifest.json",
        "signature",
        "icon.png",
        "icon@2x.png",
        "icon@3x.png",
        "logo.png",
        "logo@2x.png",
        "logo@3x.png",
        "en.lproj/pass.strings",
        "fr.lproj/pass.strings",
    }
    assert set(manifest) == set(files) - {"manifest.json", "signature"}
    for name, digest in manifest.items():
        assert hashlib.sha1(files[name]).hexdigest() == digest, name
    assert PKPASS_MEDIA_TYPE == "application/vnd.apple.pkpass"


@needs_openssl
def test_signature_verifies_with_openssl_against_the_dev_ca(
    card: StoreCard, credentials: PassCredentials, dev_paths: dict[str, Path], tmp_path: Path
) -> None:
    unpack(build_store_card(card, credentials), tmp_path)

    result = openssl_verify(tmp_path, dev_paths["ca_bundle"])

    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr
    assert (tmp_path / "verified").read_bytes() == (tmp_path / "manifest.json").read_bytes()
    # Trusting the root alone still works: the WWDR intermediate travels in the signature,
    # as devices expect (they only know Apple's root).
    assert openssl_verify(tmp_path, dev_paths["root_ca"]).returncode == 0


@needs_openssl
def test_signature_embeds_wwdr_and_signing_time(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    assert OPENSSL is not None
    unpack(build_store_card(card, credentials), tmp_path)
    signature = str(tmp_path / "signature")

    certs = subprocess.run(
        [OPENSSL, "pkcs7", "-inform", "DER", "-in", signature, "-print_certs", "-noout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    printed = subprocess.run(
        [OPENSSL, "cms", "-cmsout", "-print", "-inform", "DER", "-in", signature],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    subjects = [line for line in certs.splitlines() if line.startswith("subject=")]
    assert len(subjects) == 2
    assert any("CN = Carnet Development Worldwide Developer Relations CA" in s for s in subjects)
    assert any(f"UID = {PASS_TYPE_ID}" in s for s in subjects)
    assert "signingTime" in printed
    assert "eContent: <ABSENT>" in printed  # detached: the manifest is not inside


@needs_openssl
def test_tampered_manifest_fails_openssl_verification(
    card: StoreCard, credentials: PassCredentials, dev_paths: dict[str, Path], tmp_path: Path
) -> None:
    unpack(build_store_card(card, credentials), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_bytes())
    manifest["pass.json"] = hashlib.sha1(b"another pass").hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    result = openssl_verify(tmp_path, dev_paths["ca_bundle"])

    assert result.returncode != 0
    assert "Verification successful" not in result.stderr


def test_tampered_pass_json_no_longer_matches_the_signed_manifest(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    files = unpack(build_store_card(card, credentials), tmp_path)
    document = json.loads(files["pass.json"])
    document["storeCard"]["primaryFields"][0]["value"] = 999_999
    tampered = json.dumps(document).encode()

    manifest = json.loads(files["manifest.json"])
    assert hashlib.sha1(tampered).hexdigest() != manifest["pass.json"]


@needs_openssl
def test_signature_from_another_ca_is_refused(
    card: StoreCard,
    credentials: PassCredentials,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    other = create_dev_apple_credentials(tmp_path_factory.mktemp("other"), PASS_TYPE_ID, TEAM_ID)
    unpack(build_store_card(card, credentials), tmp_path)

    assert openssl_verify(tmp_path, other["ca_bundle"]).returncode != 0


# -- pass.json ---------------------------------------------------------------------------


def test_pass_json_has_qr_barcode_fields_and_change_messages(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    files = unpack(
        build_store_card(replace(card, news=News("Sale", "20% off")), credentials), tmp_path
    )
    document = json.loads(files["pass.json"])
    style = document["storeCard"]

    assert document["formatVersion"] == 1
    assert document["passTypeIdentifier"] == PASS_TYPE_ID
    assert document["teamIdentifier"] == TEAM_ID
    assert document["webServiceURL"] == "https://carnet.example/wallet"
    assert document["authenticationToken"] == "0123456789abcdef0123"
    assert document["backgroundColor"] == "rgb(35, 64, 143)"
    assert "barcode" not in document  # deprecated key
    assert document["barcodes"] == [
        {
            "format": "PKBarcodeFormatQR",
            "message": "CARNET-000123",
            "messageEncoding": "iso-8859-1",
            "altText": "CARNET-000123",
        }
    ]
    assert style["primaryFields"] == [
        {
            "key": "points",
            "label": "points.label",
            "value": 1250,
            "numberStyle": "PKNumberStyleDecimal",
            "changeMessage": "points.changeMessage",
        }
    ]
    assert style["secondaryFields"][0] == {
        "key": "tier",
        "label": "tier.label",
        "value": "Silver",
        "changeMessage": "tier.changeMessage",
    }
    assert style["secondaryFields"][1]["value"] == "450 points to Gold"
    assert [f["value"] for f in style["auxiliaryFields"]] == ["Zoé Martin", "CARNET-000123"]
    back = {f["key"]: f for f in style["backFields"]}
    assert back["news"] == {
        "key": "news",
        "label": "Sale",
        "value": "20% off",
        "changeMessage": "%@",
    }
    assert back["terms"]["value"] == "Points expire after 24 months."
    assert back["manage"]["value"] == "https://carnet.example/preferences"
    for entry in all_fields(document):
        assert "textAlignment" not in entry
        assert entry.get("changeMessage", "x") != ""
    keys = [f["key"] for f in all_fields(document)]
    assert len(keys) == len(set(keys))


def test_without_web_service_the_pass_has_no_update_keys(card: StoreCard) -> None:
    document = render_pass_json(replace(card, web_service_url=None, authentication_token=None))
    assert "webServiceURL" not in document
    assert "authenticationToken" not in document


def test_relevant_date_is_written_with_its_offset(card: StoreCard) -> None:
    when = dt.datetime(2026, 12, 24, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert render_pass_json(replace(card, relevant_date=when))["relevantDate"] == (
        "2026-12-24T09:30:00+01:00"
    )


# -- localisation --------------------------------------------------------------------------


def test_english_and_french_strings_translate_every_label_and_change_message(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    files = unpack(build_store_card(card, credentials), tmp_path)
    document = json.loads(files["pass.json"])
    english = parse_strings(files["en.lproj/pass.strings"])
    french = parse_strings(files["fr.lproj/pass.strings"])

    lookups = {f[a] for f in all_fields(document) for a in ("label", "changeMessage") if a in f}
    assert lookups <= set(english) and lookups <= set(french)
    assert english["points.changeMessage"] == "You now have %@ points"
    assert french["points.changeMessage"] == "Vous avez maintenant %@ points"
    assert french["memberNumber.label"] == "Numéro de membre"


def test_strings_values_are_escaped(card: StoreCard) -> None:
    tricky = 'Say "hi"\\ then\nnew line\tand tab'
    data = render_strings_file({"terms.label": tricky})

    assert parse_strings(data) == {"terms.label": tricky}
    assert '\\"hi\\"' in data.decode("utf-16")


# -- images --------------------------------------------------------------------------------


def test_default_icon_and_logo_have_apple_pixel_sizes(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    files = unpack(build_store_card(card, credentials), tmp_path)
    sizes = {}
    for name in (
        "icon.png",
        "icon@2x.png",
        "icon@3x.png",
        "logo.png",
        "logo@2x.png",
        "logo@3x.png",
    ):
        with Image.open(io.BytesIO(files[name])) as image:
            assert image.format == "PNG"
            sizes[name] = image.size
    assert sizes["icon.png"] == (29, 29)
    assert sizes["icon@2x.png"] == (58, 58)
    assert sizes["icon@3x.png"] == (87, 87)
    for scale, name in ((1, "logo.png"), (2, "logo@2x.png"), (3, "logo@3x.png")):
        assert sizes[name][0] <= 160 * scale and sizes[name][1] <= 50 * scale


def test_default_images_are_deterministic_and_in_brand_colour() -> None:
    first = default_pass_images("c", (35, 64, 143), (255, 255, 255))
    again = default_pass_images("C", (35, 64, 143), (255, 255, 255))
    assert dict(first) == dict(again)
    with Image.open(io.BytesIO(first["icon@3x.png"])) as image:
        assert image.convert("RGB").getpixel((1, 1)) == (35, 64, 143)


def test_caller_images_are_shipped_as_given(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    images = dict(default_pass_images("Z", (0, 0, 0), (255, 0, 0)))
    files = unpack(build_store_card(replace(card, images=images), credentials), tmp_path)
    assert files["logo@2x.png"] == images["logo@2x.png"]


# -- validation ----------------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def images_with(**overrides: bytes | None) -> dict[str, bytes]:
    images = dict(default_pass_images("C", (35, 64, 143), (255, 255, 255)))
    for key, value in overrides.items():
        name = key.replace("_at_", "@").replace("_png", ".png")
        if value is None:
            images.pop(name)
        else:
            images[name] = value
    return images


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"web_service_url": "http://carnet.example/wallet"}, "webServiceURL", "https"),
        ({"web_service_url": "carnet.example/wallet"}, "webServiceURL", "https"),
        ({"authentication_token": "short"}, "authenticationToken", "at least 16"),
        ({"web_service_url": None}, "webServiceURL", "required when authenticationToken"),
        ({"serial_number": "  "}, "serialNumber", "non-empty"),
        ({"organization_name": ""}, "organizationName", "required"),
        ({"description": ""}, "description", "required"),
        ({"background_color": "rgb(300, 0, 0)"}, "backgroundColor", "above 255"),
        ({"foreground_color": "blue"}, "foregroundColor", "rgb(r, g, b)"),
        ({"label_color": "#12345"}, "labelColor", "rgb(r, g, b)"),
        ({"member_number": "会員-1"}, "barcodes[0].message", "iso-8859-1"),
        ({"points": "1250"}, "points", "integer"),
        ({"pass_type_id": "pass.com.example.other"}, "passTypeIdentifier", "certificate"),
        ({"team_id": "ZZZZZ99999"}, "teamIdentifier", "certificate"),
        ({"relevant_date": dt.datetime(2026, 1, 1)}, "relevantDate", "timezone"),
        ({"images": images_with(logo_at_3x_png=None)}, "images['logo@3x.png']", "missing"),
        (
            {"images": images_with(icon_png=b"GIF89a" + b"\0" * 40)},
            "images['icon.png']",
            "not a PNG",
        ),
        ({"images": images_with(icon_png=png(30, 30))}, "images['icon.png']", "29×29"),
        ({"images": images_with(logo_at_2x_png=png(400, 100))}, "images['logo@2x.png']", "320×100"),
        (
            {"images": images_with(**{"background_png": png(10, 10)})},
            "images['background.png']",
            "not an image a store card uses",
        ),
        ({"strings": {"fr": DEFAULT_STRINGS["fr"]}}, "strings", "'en'"),
        (
            {
                "strings": {
                    **DEFAULT_STRINGS,
                    "fr": {
                        k: v
                        for k, v in DEFAULT_STRINGS["fr"].items()
                        if k != "points.changeMessage"
                    },
                }
            },
            "strings['fr']['points.changeMessage']",
            "missing translation",
        ),
        (
            {
                "strings": {
                    **DEFAULT_STRINGS,
                    "en": {**DEFAULT_STRINGS["en"], "tier.changeMessage": "New tier"},
                }
            },
            "strings['en']['tier.changeMessage']",
            "%@",
        ),
    ],
)
def test_invalid_cards_are_refused_naming_the_field(
    card: StoreCard,
    credentials: PassCredentials,
    changes: dict[str, Any],
    field: str,
    message: str,
) -> None:
    with pytest.raises(PassValidationError) as caught:
        build_store_card(replace(card, **changes), credentials)

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert message in str(caught.value)


def test_http_web_service_is_accepted_only_when_allowed(
    card: StoreCard, credentials: PassCredentials, tmp_path: Path
) -> None:
    development = replace(card, web_service_url="http://192.168.1.20:5000/wallet")
    files = unpack(build_store_card(development, credentials, allow_http=True), tmp_path)
    assert json.loads(files["pass.json"])["webServiceURL"].startswith("http://")


def test_duplicate_field_keys_are_refused(card: StoreCard) -> None:
    document = render_pass_json(card)
    document["storeCard"]["backFields"].append({"key": "points", "label": "x", "value": 1})

    with pytest.raises(PassValidationError, match="duplicate field key 'points'") as caught:
        validate_pass_json(document)
    assert caught.value.field == "storeCard.backFields[2].key"


def test_missing_top_level_key_is_refused(card: StoreCard) -> None:
    document = render_pass_json(card)
    del document["teamIdentifier"]

    with pytest.raises(PassValidationError, match="^teamIdentifier: required"):
        validate_pass_json(document)


def test_empty_change_message_is_refused(card: StoreCard) -> None:
    document = render_pass_json(card)
    document["storeCard"]["auxiliaryFields"][0]["changeMessage"] = ""

    with pytest.raises(PassValidationError, match="changeMessage: empty"):
        validate_pass_json(document)


def test_png_size_reads_the_header_only() -> None:
    assert png_size(png(87, 29)) == (87, 29)
    with pytest.raises(ValueError, match="checksum"):
        data = bytearray(png(10, 10))
        data[20] ^= 0xFF
        png_size(bytes(data))


# -- credentials -------------------------------------------------------------------------


def test_dev_credentials_are_created_once_and_kept(tmp_path: Path) -> None:
    first = create_dev_apple_credentials(tmp_path, PASS_TYPE_ID, TEAM_ID)
    contents = {name: path.read_bytes() for name, path in first.items()}

    again = create_dev_apple_credentials(tmp_path, PASS_TYPE_ID, TEAM_ID)

    assert again == first
    assert {name: path.read_bytes() for name, path in again.items()} == contents
    for name in ("private_key", "apns_key"):
        assert stat.S_IMODE(first[name].stat().st_mode) == 0o600
    assert first["apns_key"].name == f"AuthKey_{contents['apns_key_id'].decode().strip()}.p8"
    assert b"BEGIN PRIVATE KEY" in contents["apns_key"]  # PKCS#8, like Apple's .p8


def test_dev_credentials_refuse_another_pass_type(tmp_path: Path) -> None:
    create_dev_apple_credentials(tmp_path, PASS_TYPE_ID, TEAM_ID)
    with pytest.raises(DevCredentialsError, match="issued for pass type"):
        create_dev_apple_credentials(tmp_path, "pass.com.example.other", TEAM_ID)


def test_credentials_expose_the_certificate_identity(credentials: PassCredentials) -> None:
    assert credentials.pass_type_id == PASS_TYPE_ID
    assert credentials.team_id == TEAM_ID


def test_wrong_key_password_is_an_error(dev_paths: dict[str, Path]) -> None:
    with pytest.raises(ValueError):
        load_credentials(
            dev_paths["certificate"], dev_paths["private_key"], dev_paths["wwdr"], "wrong"
        )


# -- QR codes for web pages ----------------------------------------------------------------


def test_qr_svg_is_an_inline_accessible_svg() -> None:
    svg = qr_svg("CARNET-000123")
    assert svg.startswith("<svg") and not svg.startswith("<?xml")
    assert 'viewBox="0 0 29 29"' in svg  # version 2 (25 modules) + 2×4 border
    assert 'aria-label="CARNET-000123"' in svg
    assert "width=" not in svg.split(">", 1)[0]


def test_qr_png_scales_with_box_size() -> None:
    small, large = qr_png("CARNET-000123", 2), qr_png("CARNET-000123", 8)
    assert png_size(small) == (58, 58)
    assert png_size(large) == (232, 232)
