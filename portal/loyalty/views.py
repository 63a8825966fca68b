"""The loyalty page: join (with the terms), balance, tier and progress, points expiring soon,
history, the member QR code, and leaving with a confirmation step."""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    has_request_context,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask_babel import format_decimal
from flask_babel import gettext as _
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from markupsafe import Markup
from werkzeug.wrappers import Response
from wtforms import BooleanField, HiddenField
from wtforms.validators import DataRequired

from portal.auth import current_customer, login_required
from portal.core.db import get_session, utcnow
from portal.loyalty import hooks as loyalty_hooks
from portal.loyalty import ledger
from portal.loyalty.models import LedgerEntry, Member
from portal.loyalty.program import PROGRAM_EXTENSION, LoyaltyProgram, load_program
from portal.models.customer import Customer
from portal.services.consent import Proof
from portal.web import transaction
from portal.web.forms import PlainForm
from portal.web.verification import unconfirmed
from portal.web.wallet_buttons import google_save_link

bp = Blueprint("loyalty", __name__)
EXTENSION = PROGRAM_EXTENSION

KIND_LABELS = {
    "earn": _l("Earned"),
    "redeem": _l("Redeemed"),
    "adjust": _l("Adjusted"),
    "expire": _l("Expired"),
    "reversal": _l("Cancelled"),
}
# Reasons the system writes itself; people and stores write the others in their own words.
SYSTEM_REASONS = {
    "expired": _l("Points reached their expiry date"),
    "forfeited: left the programme": _l("Points forfeited when you left the programme"),
    "debt written off: left the programme": _l("Balance reset when you left the programme"),
}


class JoinForm(FlaskForm):
    terms_version = HiddenField()
    accept = BooleanField(_l("I accept the programme terms above."),
                          [DataRequired(message=_l("Tick the box to accept the terms."))])


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    """Offer the page when the app's catalog has a programme (``create_app`` loads it)."""
    app = state.app
    if EXTENSION not in app.extensions:
        app.extensions[EXTENSION] = load_program(app.config["CATALOG_PATH"])
    program: LoyaltyProgram | None = app.extensions[EXTENSION]
    if program is None:
        return
    loyalty_hooks.install(program)
    app.extensions.setdefault("carnet.nav", []).append(("loyalty.page", _l("Loyalty")))
    if not app.extensions.get("carnet.nav.installed"):
        app.extensions["carnet.nav.installed"] = True
        app.context_processor(_navigation)


def _navigation() -> dict[str, Any]:
    """``extra_nav`` for base.html, from every section registered in ``carnet.nav``."""
    if not has_request_context():   # e-mails rendered by a worker
        return {}
    return {"extra_nav": [(url_for(endpoint), str(label))
                          for endpoint, label in current_app.extensions.get("carnet.nav", [])]}


def current_program(app: Flask | None = None) -> LoyaltyProgram | None:
    app = app or current_app
    program: LoyaltyProgram | None = app.extensions.get(EXTENSION)
    return program


def _program() -> LoyaltyProgram:
    program = current_program()
    if program is None:
        abort(404)
    return program


def _proof(customer: Customer) -> Proof:
    return Proof("portal", f"customer:{customer.public_id}", request.remote_addr,
                 request.headers.get("User-Agent"))


def describe_entry(entry: LedgerEntry) -> str:
    reason = SYSTEM_REASONS.get(entry.reason)
    return str(reason) if reason is not None else entry.reason


def _member_context(program: LoyaltyProgram, member: Member) -> dict[str, Any]:
    from passes.qr import qr_svg

    db = get_session()
    now = utcnow()
    # A member whose address is not confirmed (enrolled by a store, through the API) sees
    # the card but gets no wallet button until the address is confirmed.
    wallets = not unconfirmed(current_customer())
    return {
        "member": member,
        "progress": ledger.progress(db, program, member, now),
        "expiring": ledger.expiring_soon(db, member, now),
        "entries": ledger.entries(db, member),
        "qr": Markup(qr_svg(member.member_number, label=_(
            "QR code of member number %(number)s", number=member.member_number))),
        "kind_label": lambda kind: str(KIND_LABELS.get(kind, kind)),
        "describe_entry": describe_entry,
        "plain": PlainForm(),
        "wallets": wallets,
        "google_save_link": google_save_link(program, member) if wallets else None,
    }


@bp.get("/loyalty")
@login_required
def page() -> str:
    program = _program()
    customer = current_customer()
    assert customer is not None
    member = ledger.active_member_for(get_session(), customer)
    if member is None:
        form = JoinForm(terms_version=str(program.terms.version))
        return render_template("loyalty/join.html", program=program, form=form,
                               unconfirmed=unconfirmed(customer))
    return render_template("loyalty/member.html", program=program,
                           **_member_context(program, member))


@bp.post("/loyalty/join")
@login_required
def join() -> str | Response | tuple[str, int]:
    program = _program()
    customer = current_customer()
    assert customer is not None
    form = JoinForm()
    if unconfirmed(customer):
        flash(_("Confirm your email address to join %(programme)s: follow the link in the "
                "message we sent you, or send it again below.",
                programme=program.name(_locale())), "error")
        form.terms_version.data = str(program.terms.version)
        return render_template("loyalty/join.html", program=program, form=form,
                               unconfirmed=True), 403
    if form.validate_on_submit():
        if form.terms_version.data != str(program.terms.version):
            form.accept.errors = [_("The terms changed while you were reading them. Please "
                                    "read the current version and accept it.")]
        else:
            db = get_session()
            try:
                with transaction(db):
                    ledger.enroll(db, program, customer, program.terms.version,
                                  _proof(customer))
            except ledger.AlreadyMember:
                pass
            flash(_("Welcome to %(programme)s!", programme=program.name(_locale())), "success")
            return redirect(url_for("loyalty.page"))
    form.terms_version.data = str(program.terms.version)
    return render_template("loyalty/join.html", program=program, form=form,
                           unconfirmed=False), 422


@bp.route("/loyalty/leave", methods=["GET", "POST"])
@login_required
def leave() -> str | Response | tuple[str, int]:
    program = _program()
    customer = current_customer()
    assert customer is not None
    db = get_session()
    member = ledger.active_member_for(db, customer)
    if member is None:
        return redirect(url_for("loyalty.page"))
    form = PlainForm()
    if request.method == "POST":
        if not form.validate_on_submit():
            flash(_("The form expired. Please try again."), "error")
            return redirect(url_for("loyalty.leave"))
        with transaction(db):
            ledger.leave(db, program, member, actor=f"customer:{customer.public_id}")
        flash(_("You have left %(programme)s.", programme=program.name(_locale())), "success")
        return redirect(url_for("loyalty.page"))
    return render_template("loyalty/leave.html", program=program, member=member, form=form,
                           balance=format_decimal(max(member.balance, 0)))


def _locale() -> str:
    from flask_babel import get_locale

    return str(get_locale() or "en")
