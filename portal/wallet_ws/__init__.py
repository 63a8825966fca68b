"""Wallet cards: the Apple PassKit web service (``/wallet/apple``), the member's download,
and the worker jobs that keep issued cards current."""

from __future__ import annotations

from flask import Flask

from portal.outbox import worker


def init_app(app: Flask) -> None:
    from portal.core.security import csrf
    from portal.wallet_ws import apple, jobs
    from portal.wallet_ws.issuer import EXTENSION, AppleWallet
    from portal.web import wallet_apple

    app.extensions[EXTENSION] = AppleWallet(app)
    # Devices authenticate with the card's token; they have neither cookie nor CSRF token.
    csrf.exempt(apple.bp)
    app.register_blueprint(apple.bp)
    app.register_blueprint(wallet_apple.bp)
    app.context_processor(wallet_apple.badge_context)
    every = float(app.config["APPLE_PUSH_POLL_SECONDS"])
    worker.periodic("wallet.apple.follow", every)(jobs.follow_feed)
    worker.periodic("wallet.apple.push", every)(jobs.send_pushes)
