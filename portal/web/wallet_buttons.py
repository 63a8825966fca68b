"""The "Add to … Wallet" buttons of the loyalty member page."""

from __future__ import annotations

import logging

from flask import current_app

from passes.google import GoogleWalletValidationError
from portal.core.db import get_session
from portal.loyalty.models import Member
from portal.loyalty.program import LoyaltyProgram
from portal.services import wallet_google
from portal.web import transaction

log = logging.getLogger("carnet.wallet")


def google_save_link(program: LoyaltyProgram, member: Member) -> str | None:
    """A fresh signed save link for the signed-in member (None when Google Wallet is not
    configured). Issuing it records the card, so the worker keeps it up to date. A broken
    configuration hides the button and is logged; it never breaks the member page."""
    settings = wallet_google.settings_from(current_app.config)
    if not settings.configured:
        return None
    db = get_session()
    try:
        with transaction(db):
            return wallet_google.save_link(db, program, member, settings)
    except (GoogleWalletValidationError, OSError, ValueError, KeyError):
        log.exception("no Google Wallet button: the save link could not be made")
        return None
