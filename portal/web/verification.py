"""Until a person confirms their email address, the portal keeps to what concerns only
them (their preferences, their account). Joining the loyalty programme, adding a wallet card
and subscribing to marketing email wait: anyone can sign up with someone else's address, and
these would otherwise speak for, or write to, that someone. The API is not concerned: its
callers vouch for the data they send.

The pages that hold something back show why (``templates/account/unconfirmed.html``) with a
button that sends the confirmation link again."""

from __future__ import annotations

from flask import Blueprint, flash, redirect, request, url_for
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from portal.auth import current_customer, login_required
from portal.core import mailer, ratelimit
from portal.models.customer import Customer
from portal.web import links, local_path
from portal.web.forms import PlainForm

bp = Blueprint("verification", __name__)


def unconfirmed(customer: Customer | None) -> bool:
    """True while the customer's email address is not confirmed."""
    return customer is not None and bool(customer.email) and customer.email_verified_at is None


def send_verification(customer: Customer) -> None:
    """The email with the link that confirms the address (and signs in)."""
    mailer.send(customer.email or "", "verify", customer.locale,
                link=links.external("account.verify", token=links.token(
                    "verify-email", {"c": customer.public_id, "m": customer.email,
                                     "e": customer.auth_epoch})))


@bp.post("/account/verify/resend")
@login_required
def resend() -> Response:
    customer = current_customer()
    assert customer is not None
    back = local_path(request.form.get("next")) or url_for("preferences.page")
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
        return redirect(back)
    if not unconfirmed(customer):
        flash(_("Your email address is already confirmed."), "info")
        return redirect(back)
    wait = ratelimit.hit("link", customer.email or "")  # the budget of every emailed link
    if wait:
        flash(_("Too many attempts. Try again in %(minutes)s minute(s).",
                minutes=max(1, -(-wait // 60))), "error")
        return redirect(back)
    send_verification(customer)
    flash(_("We sent a new confirmation link to %(email)s.", email=customer.email), "success")
    return redirect(back)
