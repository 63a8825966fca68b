"""Configuration: defaults, then ``instance/config.py``, then ``CARNET_*`` environment, then
overrides passed to :func:`portal.create_app` (tests).

Every setting a deployment may change is listed in :data:`SETTINGS` so the README table and the
loader cannot drift apart.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


# name -> (default, parser, description). The README's configuration table mirrors this.
SETTINGS: dict[str, tuple[Any, Any, str]] = {
    "ENV": ("development", str, "`development` or `production`; production refuses to start "
            "without a secret key and sends cookies with `Secure`."),
    "SECRET_KEY": (None, str, "Signs sessions and links. Required outside development."),
    "DATABASE_URL": (None, str, "SQLAlchemy URL; default `sqlite:///instance/carnet.db`. "
                     "PostgreSQL: `postgresql+psycopg://user@host:5432/carnet`."),
    "BASE_URL": ("http://127.0.0.1:5000", str, "Public address used in emailed links."),
    "CATALOG_PATH": (str(ROOT / "portal" / "catalog.toml"), str, "Topic catalog (TOML)."),
    "SMTP_URL": (None, str, "`smtp://user:pass@host:port` (or `smtps://`, `smtp+starttls://`). "
                 "Required outside development; in development, unset: emails are written "
                 "to `instance/outbox/`."),
    "MAIL_FROM": ("Carnet <no-reply@carnet.example>", str, "Sender of every email."),
    "EMAIL_DOUBLE_OPT_IN": (True, _bool, "Marketing email consent stays pending until the "
                            "emailed confirmation link is followed."),
    "LINK_MAX_AGE_DAYS": (7, int, "Validity of emailed sign-in links."),
    "SESSION_IDLE_MINUTES": (7 * 24 * 60, int, "A signed-in session unused for this long "
                             "ends (its cookie is refused). Sessions end anyway 31 days after "
                             "signing in, and at sign out, at a new password or address."),
    "UNSUBSCRIBE_MAX_AGE_DAYS": (400, int, "Validity of one-click unsubscribe links."),
    "REDIS_URL": (None, str, "Optional; rate limits are counted in Redis when set. Nothing "
                  "connects to Redis when it is unset."),
    "RATE_LIMIT_STORAGE": (None, str, "Where rate limits are counted: `redis` (needs "
                           "`CARNET_REDIS_URL`), `database` or `memory` (each process on its "
                           "own). Default: Redis when `CARNET_REDIS_URL` is set, else memory in "
                           "development and the database otherwise."),
    "RATE_LIMIT_KEY_PREFIX": ("carnet:rl:", str, "Prefix of the rate-limit counters' keys "
                              "(Redis or database), for deployments sharing one Redis."),
    "LOGIN_RATE_LIMIT": ("10/300", str, "Log in attempts per (address, IP): count/seconds."),
    "LOGIN_ADDRESS_RATE_LIMIT": ("30/3600", str, "Log in attempts per address, from any IP: "
                                 "count/seconds."),
    "LINK_RATE_LIMIT": ("5/900", str, "Emailed link requests per address: count/seconds."),
    "SIGNUP_RATE_LIMIT": ("20/3600", str, "Sign ups per IP: count/seconds."),
    "DEFAULT_TIMEZONE": ("Europe/Paris", str, "Time zone of customers who chose none."),
    "API_RATE_LIMIT": ("6000/60", str, "API requests per key: count/seconds (429 beyond)."),
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS": (False, _bool, "Lets webhook and web push URLs point "
                                       "to loopback, private and reserved addresses and local "
                                       "names (`localhost`, `*.local`). Off everywhere, "
                                       "development included: turn it on only to deliver to a "
                                       "receiver on your own machine."),
    "WEBHOOK_POLL_SECONDS": (1.0, float, "How often the worker looks for webhook deliveries."),
    "WEBHOOK_TIMEOUT_SECONDS": (10.0, float, "Timeout of one webhook delivery request."),
    "WEBHOOK_RETRY_BASE_SECONDS": (10.0, float, "First retry delay of a failed webhook "
                                   "delivery; doubles per failure (with jitter, up to 6 h)."),
    "WEBHOOK_MAX_ATTEMPTS": (30, int, "Consecutive failures after which an endpoint is "
                             "disabled."),
    "WEBHOOK_DISABLE_AFTER_HOURS": (72.0, float, "An endpoint failing for this long is "
                                    "disabled (deliveries resume where they stopped when "
                                    "re-enabled)."),
    "WEBHOOK_LOG_DAYS": (30, int, "Days of webhook delivery attempts kept."),
    "IDEMPOTENCY_KEEP_DAYS": (30, int, "Days the answer to an `Idempotency-Key` is kept for "
                              "replays; the worker purges older ones hourly."),
    "GOOGLE_ISSUER_ID": ("3388000000000000000", str, "Google Wallet issuer id (digits, from "
                         "the Google Pay & Wallet console); the default is a development "
                         "placeholder."),
    "GOOGLE_SERVICE_ACCOUNT_FILE": (None, str, "Google service-account key (JSON) that signs "
                                    "save links and calls the Wallet API; development default "
                                    "`instance/wallet/google/service-account.json`. Unset "
                                    "outside development: no Google Wallet button."),
    "GOOGLE_WALLET_API_URL": ("https://walletobjects.googleapis.com/walletobjects/v1", str,
                              "Google Wallet REST base URL."),
    "GOOGLE_WALLET_CLASS_SUFFIX": ("carnet-rewards", str, "Loyalty class id suffix "
                                   "(`<issuer id>.<suffix>`; letters, digits, `.`, `_`, `-`)."),
    "GOOGLE_WALLET_ORIGINS": (None, str, "Comma-separated origins allowed to show the save "
                              "button; default the origin of `BASE_URL`."),
    "GOOGLE_WALLET_ISSUER_NAME": ("Carnet", str, "Issuer name shown on Google Wallet cards."),
    "GOOGLE_WALLET_POLL_SECONDS": (5.0, float, "How often the worker pushes changed points "
                                   "and wallet messages to Google Wallet."),
    "VAPID_PRIVATE_KEY": (None, str, "Web push VAPID private key: PEM text or a path to a PEM "
                          "file; development default `instance/vapid_private.pem` (made once by "
                          "`flask --app app push vapid-keys`). Never generated on the fly: "
                          "missing, browser notifications show as unavailable."),
    "VAPID_SUBJECT": ("mailto:privacy@carnet.example", str, "Contact for push services in "
                      "VAPID tokens: a `mailto:` address or an `https:` URL."),
    "PUSH_TIMEOUT_SECONDS": (10.0, float, "Timeout of one request to a push service."),
    "PUSH_POLL_SECONDS": (1.0, float, "How often the worker fans out and sends web push."),
    "PUSH_RETRY_BASE_SECONDS": (30.0, float, "First retry delay of a web push refused with "
                                "5xx (doubles per attempt, up to 1 h; 8 attempts)."),
    "PUSH_SUBSCRIBE_RATE_LIMIT": ("30/300", str, "Push subscription changes per IP: "
                                  "count/seconds."),
    "PUSH_BEACON_RATE_LIMIT": ("120/60", str, "Display and click beacons per IP: "
                               "count/seconds."),
    "DEVICE_LOG_RATE_LIMIT": ("60/300", str, "Apple Wallet device log posts (`/wallet/apple/"
                              "v1/log`, unauthenticated) per IP: count/seconds (429 beyond)."),
    "APPLE_PASS_TYPE_ID": ("pass.dev.carnet.loyalty", str, "Apple Wallet pass type "
                           "identifier (the `UID` of the Pass Type ID certificate)."),
    "APPLE_TEAM_ID": (None, str, "Apple developer team id (10 characters). Development "
                      "uses `CARNETDEV0` with the development credentials."),
    "APPLE_CERT": (None, str, "Pass Type ID certificate (PEM). Development: "
                   "`instance/wallet/apple/pass-certificate.pem`."),
    "APPLE_KEY": (None, str, "Private key of the Pass Type ID certificate (PEM). Development: "
                  "`instance/wallet/apple/pass-key.pem`."),
    "APPLE_KEY_PASSWORD": (None, str, "Password of `CARNET_APPLE_KEY`, if it is encrypted."),
    "APPLE_WWDR": (None, str, "Apple WWDR intermediate certificate (G4, PEM or DER). "
                   "Development: `instance/wallet/apple/dev-wwdr.pem`."),
    "APNS_KEY": (None, str, "APNs token signing key (`AuthKey_<KEYID>.p8`) for pass update "
                 "pushes. Development: the key under `instance/wallet/apple/`."),
    "APNS_KEY_ID": (None, str, "Key id of `CARNET_APNS_KEY` (10 characters)."),
    "APNS_URL": ("https://api.push.apple.com", str, "APNs gateway. Wallet pass updates always "
                 "go through production, even for passes signed in development."),
    "APPLE_PASS_BACKGROUND_COLOR": ("rgb(35, 64, 143)", str, "Card background colour."),
    "APPLE_PASS_FOREGROUND_COLOR": ("rgb(255, 255, 255)", str, "Card text colour."),
    "APPLE_PASS_LABEL_COLOR": ("rgb(196, 211, 255)", str, "Card label colour."),
    "APPLE_PUSH_POLL_SECONDS": (2.0, float, "How often the worker follows loyalty changes "
                                "and sends Apple Wallet update pushes."),
    "BENCH_BARE": (False, _bool, "Benchmarks only: adds `/api/v1/_bare`, a constant JSON "
                   "answer."),
}


def load(instance_path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolve the configuration in precedence order and return a plain dict."""
    config: dict[str, Any] = {name: default for name, (default, _, _) in SETTINGS.items()}
    instance_file = instance_path / "config.py"
    if instance_file.exists():
        namespace: dict[str, Any] = {}
        exec(compile(instance_file.read_text(), str(instance_file), "exec"), namespace)
        config.update({k: v for k, v in namespace.items() if k.isupper()})
    for name, (_, parser, _) in SETTINGS.items():
        raw = os.environ.get(f"CARNET_{name}")
        if raw is not None and raw != "":
            config[name] = parser(raw)
    config.update(overrides or {})
    if not config.get("DATABASE_URL"):
        config["DATABASE_URL"] = f"sqlite:///{instance_path / 'carnet.db'}"
    if not config.get("GOOGLE_SERVICE_ACCOUNT_FILE") and config["ENV"] == "development":
        config["GOOGLE_SERVICE_ACCOUNT_FILE"] = str(
            instance_path / "wallet" / "google" / "service-account.json")
    if not config.get("VAPID_PRIVATE_KEY") and config["ENV"] == "development":
        config["VAPID_PRIVATE_KEY"] = str(instance_path / "vapid_private.pem")
    config["SECRET_KEY"] = config.get("SECRET_KEY") or _development_secret(config, instance_path)
    _check_mail(config)
    return config


def _check_mail(config: dict[str, Any]) -> None:
    """Outside development, email goes through SMTP or Carnet does not start. The local
    outbox folder holds sign-in and reset links in clear: fine on a developer's machine, a
    way into any account on a server."""
    if config["ENV"] != "development" and not config.get("SMTP_URL"):
        raise RuntimeError(
            "CARNET_SMTP_URL is not set. Outside development Carnet refuses to start without "
            "a mail server: sign-in, verification and reset links must reach people's "
            "mailboxes, not files on the server (for example "
            "CARNET_SMTP_URL=smtp+starttls://user:pass@mail.example:587)."
        )


def _development_secret(config: dict[str, Any], instance_path: Path) -> str:
    """Development keeps a generated key under instance/; anything else must be given one."""
    if config["ENV"] != "development" and not config.get("TESTING"):
        raise RuntimeError(
            "CARNET_SECRET_KEY is not set. Outside development Carnet refuses to start "
            "without a real secret key (generate one with: python -c "
            "'import secrets; print(secrets.token_urlsafe(48))')."
        )
    key_file = instance_path / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    instance_path.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


def settings_table() -> str:
    """The README's configuration table (``make readme`` refreshes it)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, (default, _, description) in SETTINGS.items():
        shown = "" if default is None else str(default).replace(str(ROOT), ".")
        lines.append(f"| `CARNET_{name}` | {f'`{shown}`' if shown else '—'} | {description} |")
    return "\n".join(lines)


def write_readme_table(readme: Path = ROOT / "README.md") -> None:
    """Refresh the configuration table between the README's settings markers."""
    text = readme.read_text()
    head, rest = text.split("<!-- settings -->", 1)
    _, tail = rest.split("<!-- /settings -->", 1)
    readme.write_text(f"{head}<!-- settings -->\n{settings_table()}\n<!-- /settings -->{tail}")
