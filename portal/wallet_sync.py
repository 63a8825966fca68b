"""Wiring for Google Wallet cards and wallet messages: the worker jobs, the ``wallet``
contact resolver, and the Google REST client kept for the worker's lifetime.

The jobs read the application they are given, never the one they were registered with, so
one registry serves every app a process creates (tests create many).
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from portal.core.db import new_session
from portal.delivery.google_wallet import GoogleWalletClient
from portal.loyalty.program import LoyaltyProgram
from portal.outbox.worker import periodic
from portal.services import wallet_google, wallet_messages

CLIENT = "carnet.google_wallet.client"


def google_client(app: Flask) -> GoogleWalletClient | None:
    """The app's Google client (token and connection reused across runs), or None when no
    service-account key is configured."""
    settings = wallet_google.settings_from(app.config)
    if not settings.configured:
        return None
    key = (settings.service_account_file, settings.api_url)
    held: tuple[Any, GoogleWalletClient] | None = app.extensions.get(CLIENT)
    if held is not None and held[0] == key:
        return held[1]
    if held is not None:
        held[1].close()
    client = wallet_google.new_client(settings)
    app.extensions[CLIENT] = (key, client)
    return client


def close_google_client(app: Flask) -> None:
    held = app.extensions.pop(CLIENT, None)
    if held is not None:
        held[1].close()


def _program(app: Flask) -> LoyaltyProgram | None:
    from portal.loyalty.views import current_program

    return current_program(app)


def sync_google_cards(app: Flask, *, mark_all: bool = False,
                      limit: int = 100) -> wallet_google.SyncReport | str:
    """Push changed points and tiers to Google Wallet cards."""
    program = _program(app)
    client = google_client(app)
    if program is None or client is None:
        return "Google Wallet is not configured"
    return wallet_google.sync_pending(
        lambda: new_session(app), client, program, wallet_google.settings_from(app.config),
        mark_all=mark_all, limit=limit)


def deliver_wallet_messages(app: Flask) -> wallet_messages.DeliveryReport:
    """Decide and deliver wallet messages accepted by the API."""
    from portal.services.catalog import get_catalog

    session = new_session(app)
    try:
        with session.begin():
            catalog = get_catalog(session)
    finally:
        session.close()
    return wallet_messages.deliver_due(
        lambda: new_session(app), catalog, google_client(app),
        default_timezone=str(app.config["DEFAULT_TIMEZONE"]))


def init_app(app: Flask) -> None:
    wallet_messages.install()
    every = float(app.config["GOOGLE_WALLET_POLL_SECONDS"])
    periodic("wallet.google.sync", every)(sync_google_cards)
    periodic("wallet.messages", every)(deliver_wallet_messages)
