"""HTML blueprints (session cookie + CSRF)."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    from portal.auth import load_customer
    from portal.web import account, main, preferences, privacy, unsubscribe

    app.before_request(load_customer)
    for module in (main, account, preferences, unsubscribe, privacy):
        app.register_blueprint(module.bp)
