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

ROOT = Path(__file__).resolve().parent.parent


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
    "SMTP_URL": (None, str, "`smtp://user:pass@host:port` (or `smtps://`, `smtp+starttls://`); "
                 "unset: emails are written to `instance/outbox/`."),
    "MAIL_FROM": ("Carnet <no-reply@carnet.example>", str, "Sender of every email."),
    "EMAIL_DOUBLE_OPT_IN": (True, _bool, "Marketing email consent stays pending until the "
                            "emailed confirmation link is followed."),
    "LINK_MAX_AGE_DAYS": (7, int, "Validity of emailed sign-in links."),
    "UNSUBSCRIBE_MAX_AGE_DAYS": (400, int, "Validity of one-click unsubscribe links."),
    "REDIS_URL": (None, str, "Optional; rate limits are shared through Redis when set."),
    "LOGIN_RATE_LIMIT": ("10/300", str, "Log in attempts per (address, IP): count/seconds."),
    "LINK_RATE_LIMIT": ("5/900", str, "Emailed link requests per address: count/seconds."),
    "SIGNUP_RATE_LIMIT": ("20/3600", str, "Sign ups per IP: count/seconds."),
    "DEFAULT_TIMEZONE": ("Europe/Paris", str, "Time zone of customers who chose none."),
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
    config["SECRET_KEY"] = config.get("SECRET_KEY") or _development_secret(config, instance_path)
    return config


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
