"""Signed-in sessions on the account page (sign out one, or every other), and the single-use
"confirm it's you" link that sensitive changes ask for when no password is typed."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from portal.auth import current_customer, current_sign_in, login_required, sign_in, sign_out
from portal.core import mailer, ratelimit
from portal.core.db import get_session, utcnow
from portal.core.tokens import PURPOSES, TokenError, new_link_id
from portal.services import accounts, sign_ins
from portal.web import links, transaction
from portal.web.account import bad_link
from portal.web.devices import device_name
from portal.web.forms import PlainForm

bp = Blueprint("sign_ins", __name__)

# Where a confirmation link may lead back to: the pages that ask for it.
CONFIRM_TARGETS = {"settings": "account.settings", "delete": "privacy.delete"}
CONFIRM_MINUTES = int(sign_ins.CONFIRM_FRESH.total_seconds()) // 60


bp.add_app_template_filter(device_name, "device_name")


@bp.app_context_processor
def _confirmation_state() -> dict[str, Any]:
    return {"confirmed_until": confirmed_until,
            "confirm_minutes": CONFIRM_MINUTES}


def confirmed_until() -> datetime | None:
    """Until when this session may make sensitive changes without the password, if at all."""
    row = current_sign_in()
    if not sign_ins.may_change_credentials(row, utcnow()):
        return None
    assert row is not None
    return row.created_at + sign_ins.CONFIRM_FRESH


@bp.post("/account/sessions/<int:session_id>/end")
@login_required
def end_one(session_id: int) -> Response:
    customer, current = current_customer(), current_sign_in()
    assert customer is not None and current is not None
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
    elif session_id == current.id:
        sign_out()
        flash(_("You are signed out."), "success")
        return redirect(url_for("main.index"))
    else:
        db = get_session()
        with transaction(db):
            sign_ins.end(db, customer, session_id)
        flash(_("That session is signed out."), "success")
    return redirect(url_for("account.settings"))


@bp.post("/account/sessions/end-others")
@login_required
def end_others() -> Response:
    customer, current = current_customer(), current_sign_in()
    assert customer is not None and current is not None
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
    else:
        db = get_session()
        with transaction(db):
            sign_ins.end_all(db, customer, keep=current.id)
        flash(_("Every other session is signed out."), "success")
    return redirect(url_for("account.settings"))


@bp.post("/account/confirm")
@login_required
def request_confirmation() -> Response:
    """Email a single-use link to the account's address; following it within 15 minutes
    allows the sensitive changes without the password."""
    customer = current_customer()
    assert customer is not None
    back = request.form.get("next", "settings")
    back = back if back in CONFIRM_TARGETS else "settings"
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
    elif not customer.email:
        flash(_("Your account has no email address to send a link to."), "error")
    elif ratelimit.hit("link", customer.email):
        flash(_("Too many links asked for. Try again in a few minutes."), "error")
    else:
        link = links.external("sign_ins.confirm", token=links.token("confirm-identity", {
            "c": customer.public_id, "e": customer.auth_epoch, "j": new_link_id(), "n": back}))
        mailer.send(customer.email, "confirm_identity", customer.locale, link=link,
                    minutes=PURPOSES["confirm-identity"] // 60)
        flash(_("We sent a link to %(email)s. It works once, for %(minutes)s minutes.",
                email=customer.email, minutes=PURPOSES["confirm-identity"] // 60), "success")
    return redirect(url_for(CONFIRM_TARGETS[back]))


@bp.route("/account/confirm/<token>", methods=["GET", "POST"])
def confirm(token: str) -> str | Response | tuple[str, int]:
    """GET shows a button, POST signs in (fresh): a mail scanner opening the link neither
    signs itself in nor uses the link up."""
    try:
        data = links.read("confirm-identity", token)
    except TokenError as exc:
        return bad_link(exc.reason)
    db = get_session()
    customer = accounts.find_by_public_id(db, str(data.get("c")))
    link_id = str(data.get("j") or "")
    if customer is None or customer.erased_at is not None or \
            customer.auth_epoch != data.get("e") or accounts.link_used(db, link_id):
        return bad_link("used")
    form = PlainForm()
    if form.validate_on_submit():
        with transaction(db):
            fresh = accounts.use_link_once(db, link_id, utcnow() + timedelta(
                seconds=PURPOSES["confirm-identity"]))
        if not fresh:
            return bad_link("used")
        sign_in(customer, "confirm")
        flash(_("Thank you. For the next %(minutes)s minutes you can make changes without "
                "your password.", minutes=CONFIRM_MINUTES), "success")
        back = str(data.get("n"))
        return redirect(url_for(CONFIRM_TARGETS.get(back, "account.settings")))
    return render_template("account/confirm.html", form=form)
