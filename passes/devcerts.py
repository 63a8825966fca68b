"""Local stand-ins for Apple's signing material, for development and tests.

Real passes are signed with a Pass Type ID certificate issued by Apple's WWDR intermediate,
and update pushes are authorised with a ``.p8`` token key.  Neither can be obtained offline,
yet the whole chain (signing, ``openssl smime -verify``, APNs JWTs) must be exercised for
real.  This module builds a chain with the same shape: a root CA, a WWDR-like intermediate,
a Pass Type ID leaf (subject ``UID`` = pass type identifier, ``OU`` = team identifier, as in
Apple's certificates) and an EC P-256 PKCS#8 APNs key.

Files are created once and then kept: a pass already handed to a device must keep
verifying, so nothing here ever regenerates an existing file.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# File names inside the credentials directory.
ROOT_CERT: Final = "dev-root-ca.pem"
ROOT_KEY: Final = "dev-root-ca.key.pem"
WWDR_CERT: Final = "dev-wwdr.pem"
WWDR_KEY: Final = "dev-wwdr.key.pem"
PASS_CERT: Final = "pass-certificate.pem"
PASS_KEY: Final = "pass-key.pem"
CA_BUNDLE: Final = "ca-bundle.pem"
APNS_KEY_ID: Final = "apns-key-id.txt"

_VALIDITY: Final = dt.timedelta(days=3650)
# RSA, as Apple's pass certificates are; RSA also keeps the keys usable by other tooling
# (node-forge based generators only sign with RSA).
_RSA_BITS: Final = 2048


class DevCredentialsError(RuntimeError):
    """The directory holds a partial or mismatching set of development credentials."""


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    # Create with restrictive permissions from the start, so a key is never world-readable
    # even for an instant; 0o600 for keys, 0o644 for certificates.
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: str | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DevCredentialsError(f"{path} is not an RSA private key")
    return key


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _ca_certificate(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    path_length: int | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _pass_certificate(
    pass_type_id: str,
    team_id: str,
    key: rsa.RSAPrivateKey,
    issuer: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = _name(
        (NameOID.USER_ID, pass_type_id),
        (NameOID.COMMON_NAME, f"Pass Type ID: {pass_type_id}"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, team_id),
        (NameOID.ORGANIZATION_NAME, "Carnet Development"),
        (NameOID.COUNTRY_NAME, "FR"),
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Code/e-mail signing purposes so `openssl smime -verify` accepts it even without
        # `-purpose any`.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CODE_SIGNING]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ensure_authority(directory: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """Return the intermediate (WWDR-like) certificate and key, creating the CAs if absent."""
    root_cert_path, root_key_path = directory / ROOT_CERT, directory / ROOT_KEY
    wwdr_cert_path, wwdr_key_path = directory / WWDR_CERT, directory / WWDR_KEY
    if wwdr_cert_path.exists() and wwdr_key_path.exists():
        wwdr = x509.load_pem_x509_certificate(wwdr_cert_path.read_bytes())
        return wwdr, _load_key(wwdr_key_path)
    if wwdr_cert_path.exists() or wwdr_key_path.exists():
        raise DevCredentialsError(
            f"{directory}: only one of {WWDR_CERT} and {WWDR_KEY} exists; restore the other "
            "or remove the directory (existing passes will stop verifying)"
        )
    if (directory / PASS_CERT).exists():
        raise DevCredentialsError(
            f"{directory}: {PASS_CERT} exists but its issuing authority is missing"
        )

    if root_cert_path.exists() and root_key_path.exists():
        root = x509.load_pem_x509_certificate(root_cert_path.read_bytes())
        root_key = _load_key(root_key_path)
    elif root_cert_path.exists() or root_key_path.exists():
        raise DevCredentialsError(f"{directory}: only one of {ROOT_CERT} and {ROOT_KEY} exists")
    else:
        root_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        root_name = _name(
            (NameOID.COMMON_NAME, "Carnet Development Root CA"),
            (NameOID.ORGANIZATION_NAME, "Carnet Development"),
            (NameOID.COUNTRY_NAME, "FR"),
        )
        root = _ca_certificate(root_name, root_key, root_name, root_key, path_length=1)
        _write(root_key_path, _key_pem(root_key, None), secret=True)
        _write(root_cert_path, _pem(root), secret=False)

    wwdr_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    wwdr_name = _name(
        (NameOID.COMMON_NAME, "Carnet Development Worldwide Developer Relations CA"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "G4"),
        (NameOID.ORGANIZATION_NAME, "Carnet Development"),
        (NameOID.COUNTRY_NAME, "FR"),
    )
    wwdr = _ca_certificate(wwdr_name, wwdr_key, root.subject, root_key, path_length=0)
    _write(wwdr_key_path, _key_pem(wwdr_key, None), secret=True)
    _write(wwdr_cert_path, _pem(wwdr), secret=False)
    return wwdr, wwdr_key


def _check_pass_certificate(path: Path, pass_type_id: str, team_id: str) -> None:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    uid = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)]
    ou = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if uid != [pass_type_id] or ou != [team_id]:
        raise DevCredentialsError(
            f"{path} was issued for pass type {uid} / team {ou}, not {pass_type_id!r} / "
            f"{team_id!r}; use another directory for another pass type"
        )


def create_dev_apple_credentials(
    directory: Path, pass_type_id: str, team_id: str, *, password: str | None = None
) -> dict[str, Path]:
    """Create (once) and return the paths of a development signing and push kit.

    Keys of the returned dict: ``root_ca``, ``wwdr``, ``certificate``, ``private_key``
    (encrypted with ``password`` when one is given), ``ca_bundle`` (root + intermediate, for
    ``openssl smime -verify -CAfile``), ``apns_key`` (``AuthKey_<KEYID>.p8``) and
    ``apns_key_id`` (a text file holding the 10-character key id; see :func:`read_key_id`).

    Existing files are kept as they are; a directory holding credentials for another pass
    type, or a partial chain that cannot be completed consistently, raises
    :class:`DevCredentialsError` instead of silently replacing anything.
    """
    if not pass_type_id or not team_id:
        raise ValueError("pass_type_id and team_id are required")
    if not directory.exists():
        directory.mkdir(parents=True)
        os.chmod(directory, 0o700)  # only our own directory; never re-permission an existing one

    pass_cert_path, pass_key_path = directory / PASS_CERT, directory / PASS_KEY
    if pass_cert_path.exists() != pass_key_path.exists():
        raise DevCredentialsError(
            f"{directory}: only one of {PASS_CERT} and {PASS_KEY} exists; restore the other "
            "or remove the directory (existing passes will stop verifying)"
        )
    if pass_cert_path.exists():
        _check_pass_certificate(pass_cert_path, pass_type_id, team_id)
    else:
        wwdr, wwdr_key = _ensure_authority(directory)
        pass_key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        cert = _pass_certificate(pass_type_id, team_id, pass_key, wwdr, wwdr_key)
        _write(pass_key_path, _key_pem(pass_key, password), secret=True)
        _write(pass_cert_path, _pem(cert), secret=False)

    bundle_path = directory / CA_BUNDLE
    if not bundle_path.exists():
        _write(
            bundle_path,
            (directory / ROOT_CERT).read_bytes() + (directory / WWDR_CERT).read_bytes(),
            secret=False,
        )

    key_id_path = directory / APNS_KEY_ID
    existing_p8 = sorted(directory.glob("AuthKey_*.p8"))
    if key_id_path.exists():
        key_id = key_id_path.read_text().strip()
    elif existing_p8:
        key_id = existing_p8[0].name.removeprefix("AuthKey_").removesuffix(".p8")
    else:
        # Apple key ids are 10 upper-case alphanumerics.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        key_id = "".join(secrets.choice(alphabet) for _ in range(10))
    apns_key_path = directory / f"AuthKey_{key_id}.p8"
    if not apns_key_path.exists():
        apns_key = ec.generate_private_key(ec.SECP256R1())
        _write(apns_key_path, _key_pem(apns_key, None), secret=True)
    if not key_id_path.exists():
        _write(key_id_path, f"{key_id}\n".encode(), secret=False)

    return {
        "root_ca": directory / ROOT_CERT,
        "wwdr": directory / WWDR_CERT,
        "certificate": pass_cert_path,
        "private_key": pass_key_path,
        "ca_bundle": bundle_path,
        "apns_key": apns_key_path,
        "apns_key_id": key_id_path,
    }


def read_key_id(paths: dict[str, Path]) -> str:
    """Return the APNs key id recorded by :func:`create_dev_apple_credentials`."""
    return paths["apns_key_id"].read_text().strip()
