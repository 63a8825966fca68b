"""Carnet: the self-service preference center."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask

from portal.core.config import ROOT


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Wire the application; no logic lives here."""
    app = Flask(
        "portal",
        instance_path=str(Path((overrides or {}).get("INSTANCE_PATH", ROOT / "instance"))),
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
    )
    from portal.core import config

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

    from portal import cli
    from portal.core import db, errors, i18n, mailer, ratelimit, security
    from portal.web import register as register_web

    db.init_app(app)
    i18n.init_app(app)
    security.init_app(app)
    ratelimit.init_app(app)
    mailer.init_app(app)
    load_loyalty_program(app)
    register_personal_data(app)
    register_web(app)
    from portal import api
    from portal.outbox import worker

    api.init_app(app)
    worker.init_app(app)
    from portal import wallet_sync

    wallet_sync.init_app(app)
    from portal import wallet_ws

    wallet_ws.init_app(app)
    errors.init_app(app)
    cli.init_app(app)
    return app


def load_loyalty_program(app: Flask) -> None:
    """The programme of today's catalog (None without a ``[loyalty]`` table) belongs to the
    app, not to the loyalty page: erasure, the worker and the commands need it too. A broken
    table stops the start."""
    from portal.loyalty.program import PROGRAM_EXTENSION, load_program

    app.extensions[PROGRAM_EXTENSION] = load_program(app.config["CATALOG_PATH"])


def register_personal_data(app: Flask) -> None:
    """Every domain that holds personal data registers its part of export and erasure on the
    app (``app.extensions["carnet.privacy"]``), whatever the catalog offers, whichever pages
    are mounted, and in every process (web, worker, commands). A new domain holding personal
    data adds its line here."""
    from portal.loyalty import hooks as loyalty_hooks
    from portal.loyalty.program import PROGRAM_EXTENSION
    from portal.push import messages as push_messages
    from portal.push import subscriptions as push
    from portal.services import privacy, wallet_apple, wallet_google, wallet_messages

    hooks = privacy.hooks_of(app.extensions)
    loyalty_hooks.register_privacy(hooks, app.extensions[PROGRAM_EXTENSION])
    wallet_apple.register_privacy(hooks)
    wallet_google.register_privacy(hooks)
    wallet_messages.register_privacy(hooks)
    push.register_privacy(hooks)
    push_messages.register_privacy(hooks)
