"""The application's Apple Wallet setup: where the signing and push credentials are, parsed
once per process, and the plain settings the wallet services take.

In development, unset paths fall back to the files ``flask --app app wallet dev-credentials``
writes under ``instance/wallet/apple/``, and the web service may be plain http (devices with
the developer setting "Allow HTTP Services" accept it). Elsewhere every path must be set; a
deployment without them simply offers no Apple Wallet card.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from flask import Flask, current_app

from passes import devcerts
from passes.apple import PassCredentials, load_credentials
from portal.delivery.apns import APNsClient
from portal.loyalty.program import LoyaltyProgram
from portal.services.wallet_apple import CardSettings

EXTENSION: Final = "carnet.wallet.apple"
DEV_TEAM_ID: Final = "CARNETDEV0"


def dev_directory(app: Flask) -> Path:
    return Path(app.instance_path) / "wallet" / "apple"


@dataclass(frozen=True)
class ApplePaths:
    certificate: Path | None
    private_key: Path | None
    wwdr: Path | None
    apns_key: Path | None
    apns_key_id: str | None


class AppleWallet:
    """Credentials loaded on first use and kept; settings read from the config each time
    (tests and the live server change ``BASE_URL`` after start-up)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._credentials: PassCredentials | None = None
        self._apns: APNsClient | None = None

    @property
    def development(self) -> bool:
        return self.app.config["ENV"] == "development" or bool(self.app.config.get("TESTING"))

    @property
    def pass_type_id(self) -> str:
        return str(self.app.config["APPLE_PASS_TYPE_ID"])

    @property
    def team_id(self) -> str | None:
        team = self.app.config.get("APPLE_TEAM_ID")
        return str(team) if team else (DEV_TEAM_ID if self.development else None)

    def paths(self) -> ApplePaths:
        config = self.app.config
        dev = dev_directory(self.app) if self.development else None

        def pick(name: str, dev_file: str) -> Path | None:
            if config.get(name):
                return Path(config[name])
            return dev / dev_file if dev is not None else None

        key_id = config.get("APNS_KEY_ID")
        apns_key = Path(config["APNS_KEY"]) if config.get("APNS_KEY") else None
        if dev is not None and (dev / devcerts.APNS_KEY_ID).exists():
            key_id = key_id or (dev / devcerts.APNS_KEY_ID).read_text().strip()
            apns_key = apns_key or dev / f"AuthKey_{key_id}.p8"
        return ApplePaths(
            certificate=pick("APPLE_CERT", devcerts.PASS_CERT),
            private_key=pick("APPLE_KEY", devcerts.PASS_KEY),
            wwdr=pick("APPLE_WWDR", devcerts.WWDR_CERT),
            apns_key=apns_key,
            apns_key_id=str(key_id) if key_id else None,
        )

    @property
    def available(self) -> bool:
        """Whether cards can be signed here (credentials present)."""
        paths = self.paths()
        files = (paths.certificate, paths.private_key, paths.wwdr)
        return self.team_id is not None and all(p is not None and p.is_file() for p in files)

    @property
    def can_push(self) -> bool:
        paths = self.paths()
        return (self.team_id is not None and paths.apns_key is not None
                and paths.apns_key.is_file() and bool(paths.apns_key_id))

    def credentials(self) -> PassCredentials:
        with self._lock:
            if self._credentials is None:
                paths = self.paths()
                assert paths.certificate and paths.private_key and paths.wwdr
                self._credentials = load_credentials(
                    paths.certificate, paths.private_key, paths.wwdr,
                    self.app.config.get("APPLE_KEY_PASSWORD") or None)
            return self._credentials

    def card_settings(self, program: LoyaltyProgram) -> CardSettings:
        config = self.app.config
        assert self.team_id is not None
        return CardSettings(
            pass_type_id=self.pass_type_id,
            team_id=self.team_id,
            base_url=str(config["BASE_URL"]),
            program=program,
            background_color=str(config["APPLE_PASS_BACKGROUND_COLOR"]),
            foreground_color=str(config["APPLE_PASS_FOREGROUND_COLOR"]),
            label_color=str(config["APPLE_PASS_LABEL_COLOR"]),
            allow_http=self.development,
        )

    def apns(self) -> APNsClient:
        """One client (one HTTP/2 connection) kept across worker runs, as Apple asks."""
        with self._lock:
            if self._apns is None:
                paths = self.paths()
                assert self.team_id and paths.apns_key and paths.apns_key_id
                options: dict[str, Any] = {}
                # A non-Apple gateway (a local stand-in) brings its own trust anchor.
                if self.app.config.get("APNS_CA_FILE"):
                    options["ca_file"] = self.app.config["APNS_CA_FILE"]
                    options["trust_env"] = False
                self._apns = APNsClient.from_key_file(
                    paths.apns_key, team_id=self.team_id, key_id=paths.apns_key_id,
                    topic=self.pass_type_id, base_url=str(self.app.config["APNS_URL"]),
                    **options)
            return self._apns

    def close(self) -> None:
        with self._lock:
            if self._apns is not None:
                self._apns.close()
                self._apns = None


def apple_wallet(app: Flask | None = None) -> AppleWallet:
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    wallet: AppleWallet = app.extensions[EXTENSION]
    return wallet
