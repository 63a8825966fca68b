"""The member's Apple Wallet card, from the loyalty page's "Add to Apple Wallet" badge."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, current_app, flash, redirect, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response as BaseResponse

from portal.auth import current_customer, login_required
from portal.core.db import get_session
from portal.loyalty import ledger
from portal.loyalty.views import current_program
from portal.services import wallet_apple
from portal.wallet_ws.issuer import apple_wallet
from portal.web import transaction
from portal.web.verification import unconfirmed

bp = Blueprint("wallet_apple", __name__)


@bp.get("/loyalty/wallet/apple.pkpass")
@login_required
def download() -> BaseResponse:
    """Only ever the signed-in member's own card: the URL names no one. Not before the
    member's address is confirmed (see ``portal.web.verification``)."""
    program = current_program()
    wallet = apple_wallet()
    customer = current_customer()
    assert customer is not None
    db = get_session()
    member = ledger.active_member_for(db, customer)
    if program is None or member is None or not wallet.available:
        abort(404)
    if unconfirmed(customer):
        flash(_("Confirm your email address to add your card to a wallet: follow the link in "
                "the message we sent you, or send it again below."), "error")
        return redirect(url_for("loyalty.page"))
    with transaction(db):
        data, apple_pass = wallet_apple.build_pkpass(
            db, member, wallet.card_settings(program), wallet.credentials())
    response = Response(data, mimetype="application/vnd.apple.pkpass")
    response.headers["Content-Disposition"] = "attachment; filename=carnet.pkpass"
    # The file carries the card's authentication token: keep it out of shared caches.
    response.headers["Cache-Control"] = "private, no-store"
    response.last_modified = wallet_apple.last_modified(apple_pass)
    return response


def badge_context() -> dict[str, Any]:
    """``apple_wallet_available`` for templates/wallet/apple_badge.html."""
    return {"apple_wallet_available": apple_wallet(current_app).available
            and current_program() is not None}
