"""A local stand-in for a Google Cloud service-account key, for development and tests.

Carnet signs save links and asks for REST tokens with a service-account key. Developers
and the test suite have no real one, so this writes a key file in exactly Google's format,
with a fresh RSA key and a ``token_uri`` pointing wherever the caller says (a local fake
token endpoint). Real Google will not accept it; everything on our side treats it as real.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_DEV_CLIENT_EMAIL = "carnet-dev@carnet-dev.iam.gserviceaccount.com"


def create_dev_service_account(
    path: Path,
    token_uri: str,
    client_email: str = DEFAULT_DEV_CLIENT_EMAIL,
) -> Path:
    """Write a service-account JSON key at ``path`` unless one is already there.

    Never overwrites: every save link already handed out was signed with the existing key,
    and replacing it would make those links fail verification. The file is created
    atomically (written aside, then hard-linked into place) with mode 0600, so a
    concurrent process sees either no file or a complete one, and never a readable key.
    """
    path = Path(path)
    if path.exists():
        return path
    if "@" not in client_email:
        raise ValueError(f"client_email must be an email address, got {client_email!r}")

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")
    domain = client_email.split("@", 1)[1]
    project_id = domain.split(".", 1)[0]
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": str(secrets.randbelow(9 * 10**20) + 10**20),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": (
            "https://www.googleapis.com/robot/v1/metadata/x509/" + quote(client_email, safe="")
        ),
        "universe_domain": "googleapis.com",
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".service-account-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
            handle.write("\n")
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            pass  # another process won the race; its key is the one links were signed with
    finally:
        os.unlink(tmp_name)
    return path
