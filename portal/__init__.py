"""Carnet: the self-service preference center."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask

from portal.config import ROOT


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Wire the application; no logic lives here."""
    app = Flask(
        "portal",
        instance_path=str(Path((overrides or {}).get("INSTANCE_PATH", ROOT / "instance"))),
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    from portal import config

    app.config.update(config.load(Path(app.instance_path), overrides))
    production = app.config["ENV"] != "development"
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=production,
        SESSION_COOKIE_NAME="carnet_session",
        # Flask's own default is None (no limit), so the key is always there: test its value.
        MAX_CONTENT_LENGTH=app.config.get("MAX_CONTENT_LENGTH") or 2 * 1024 * 1024,
        WTF_CSRF_TIME_LIMIT=None,
        BABEL_TRANSLATION_DIRECTORIES=str(ROOT / "translations"),
    )
    logging.basicConfig(level=logging.INFO)

    from portal import cli, db, errors, i18n, mailer, ratelimit, security
    from portal.web import register as register_web

    db.init_app(app)
    i18n.init_app(app)
    security.init_app(app)
    ratelimit.init_app(app)
    mailer.init_app(app)
    register_web(app)
    from portal import api, worker

    api.init_app(app)
    worker.init_app(app)
    from portal import wallet_sync

    wallet_sync.init_app(app)
    from portal import wallet_ws

    wallet_ws.init_app(app)
    errors.init_app(app)
    cli.init_app(app)
    return app
