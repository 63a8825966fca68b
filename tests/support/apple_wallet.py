"""Helpers for Apple Wallet tests: development credentials shared by a test session, the app
settings that point at them, and checking a ``.pkpass`` the way a device (and openssl) would."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from passes.devcerts import create_dev_apple_credentials, read_key_id

PASS_TYPE_ID = "pass.dev.carnet.loyalty"
TEAM_ID = "CARNETDEV0"
OPENSSL = shutil.which("openssl")


def dev_credentials(directory: Path) -> dict[str, Path]:
    return create_dev_apple_credentials(directory, PASS_TYPE_ID, TEAM_ID)


def wallet_settings(paths: dict[str, Path]) -> dict[str, Any]:
    """App config overrides that sign with ``paths`` and push with its APNs key."""
    return {
        "APPLE_PASS_TYPE_ID": PASS_TYPE_ID,
        "APPLE_TEAM_ID": TEAM_ID,
        "APPLE_CERT": str(paths["certificate"]),
        "APPLE_KEY": str(paths["private_key"]),
        "APPLE_WWDR": str(paths["wwdr"]),
        "APNS_KEY": str(paths["apns_key"]),
        "APNS_KEY_ID": read_key_id(paths),
    }


def unpack(pkpass: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(pkpass)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def check_manifest(files: dict[str, bytes]) -> dict[str, str]:
    """Every file but the manifest and signature is listed with its SHA-1, and nothing else."""
    manifest: dict[str, str] = json.loads(files["manifest.json"])
    assert set(manifest) == set(files) - {"manifest.json", "signature"}
    for name, digest in manifest.items():
        assert hashlib.sha1(files[name]).hexdigest() == digest, name
    return manifest


def openssl_verify(files: dict[str, bytes], ca_bundle: Path, directory: Path
                   ) -> subprocess.CompletedProcess[str]:
    """``openssl smime -verify`` of the detached signature over manifest.json."""
    assert OPENSSL is not None, "the openssl command is needed to check pass signatures"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "signature").write_bytes(files["signature"])
    (directory / "manifest.json").write_bytes(files["manifest.json"])
    return subprocess.run(
        [OPENSSL, "smime", "-verify", "-binary", "-inform", "DER",
         "-in", str(directory / "signature"), "-content", str(directory / "manifest.json"),
         "-CAfile", str(ca_bundle), "-purpose", "any", "-out", str(directory / "verified")],
        capture_output=True, text=True, check=False)


def assert_valid_pass(pkpass: bytes, ca_bundle: Path, directory: Path) -> dict[str, Any]:
    """Unzip, check the manifest and the signature, check that tampering is detected, and
    return pass.json."""
    files = unpack(pkpass)
    check_manifest(files)
    verified = openssl_verify(files, ca_bundle, directory / "good")
    assert verified.returncode == 0, verified.stderr
    tampered = dict(files)
    manifest = json.loads(files["manifest.json"])
    manifest["pass.json"] = hashlib.sha1(b"{}").hexdigest()
    tampered["manifest.json"] = json.dumps(manifest, sort_keys=True,
                                           separators=(",", ":")).encode()
    refused = openssl_verify(tampered, ca_bundle, directory / "tampered")
    assert refused.returncode != 0
    document: dict[str, Any] = json.loads(files["pass.json"])
    return document


def strings_of(files: dict[str, bytes], locale: str) -> dict[str, str]:
    """The ``<locale>.lproj/pass.strings`` table (UTF-16 with BOM, ``"k" = "v";`` lines)."""
    text = files[f"{locale}.lproj/pass.strings"].decode("utf-16")
    table: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition('" = "')
        table[json.loads(key + '"')] = json.loads('"' + value.removesuffix(";"))
    return table
