"""The preference page: topic × channel switches, channel switches, pause, contact points,
contact pressure, history, and the double opt-in confirmation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from portal.auth import current_customer, login_required
from portal.core import mailer
from portal.core.db import get_session, utcnow
from portal.core.tokens import TokenError
from portal.models.consent import ANY
from portal.models.customer import Customer
from portal.services import catalog as catalog_service
from portal.services import preferences as prefs
from portal.services.accounts import AccountError, find_by_public_id
from portal.services.catalog import Catalog
from portal.services.consent import Proof, current_states, history
from portal.services.decisions import consent_matrix
from portal.web import links, transaction
from portal.web.describe import describe
from portal.web.errors_text import account_error
from portal.web.forms import ContactForm, PlainForm
from portal.web.verification import unconfirmed

bp = Blueprint("preferences", __name__)

PRESSURE_CHANNELS = ("email", "sms", "voice", "app_push", "web_push")


def proof(source: str = "portal") -> Proof:
    customer = current_customer()
    return Proof(source=source, actor=f"customer:{customer.public_id}" if customer else "anonymous",
                 ip=request.remote_addr, user_agent=request.headers.get("User-Agent"))


@dataclass
class Cell:
    topic: str
    channel: str
    on: bool
    pending: bool
    effective: bool
    reason: str


def _page_context(customer: Customer, catalog: Catalog, contact_form: ContactForm | None = None,
                  errors: dict[str, str] | None = None) -> dict[str, object]:
    db = get_session()
    states = current_states(db, customer)
    matrix = consent_matrix(db, catalog, customer, utcnow())
    rows = []
    for topic in catalog.ordered():
        cells = [
            Cell(topic.key, ch, prefs.cell_is_on(states, catalog, topic.key, ch),
                 states.get((topic.key, ch)) == "pending", matrix[(topic.key, ch)].allowed,
                 matrix[(topic.key, ch)].reason)
            for ch in topic.channels
        ]
        rows.append((topic, cells))
    channels = prefs.offered_channels(catalog)
    if contact_form is None:
        contact_form = ContactForm(phone=customer.phone, postal_address=customer.postal_address)
    return {
        "rows": rows,
        "channels": channels,
        "channels_off": {ch for ch in channels if states.get((ANY, ch)) == "withdrawn"},
        "paused": states.get((ANY, ANY)) == "withdrawn",
        "form": PlainForm(),
        "contact_form": contact_form,
        "pressure": prefs.contact_pressure(db, customer),
        "pressure_channels": PRESSURE_CHANNELS,
        "timezone": customer.timezone or current_app.config["DEFAULT_TIMEZONE"],
        "timezones": sorted(prefs.TIMEZONES),
        "errors": errors or {},
    }


@bp.get("/preferences")
@login_required
def page() -> str:
    customer = current_customer()
    assert customer is not None
    catalog = catalog_service.get_catalog(get_session())
    return render_template("preferences/page.html", **_page_context(customer, catalog))


@bp.post("/preferences")
@login_required
def save() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    db = get_session()
    catalog = catalog_service.get_catalog(db)
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
        return redirect(url_for("preferences.page"))
    cells = frozenset(
        (topic.key, ch) for topic in catalog.ordered() for ch in topic.channels
        if request.form.get(f"c:{topic.key}:{ch}") == "on"
    )
    wanted = prefs.Wanted(
        cells=cells,
        channels_off=frozenset(ch for ch in prefs.offered_channels(catalog)
                               if request.form.get(f"off:{ch}") == "on"),
        paused=request.form.get("paused") == "on",
    )
    with transaction(db):
        applied = prefs.apply_preferences(
            db, customer, catalog, wanted, proof(),
            double_opt_in=current_app.config["EMAIL_DOUBLE_OPT_IN"],
            email_confirmed=not unconfirmed(customer),
        )
    if applied.held_email_topics:
        flash(_("Email subscriptions start once your email address is confirmed: follow the "
                "link in the message we sent you, or send it again below, then switch them "
                "on.") + (" " + _("Your other choices are saved.") if applied.recorded else ""),
              "error")
    elif applied.pending_email_topics and customer.email:
        mailer.send(
            customer.email, "confirm_consent", customer.locale,
            topics=[catalog.topics[t] for t in applied.pending_email_topics],
            link=links.external("preferences.confirm", token=links.token(
                "confirm-consent", {"c": customer.public_id, "t": applied.pending_email_topics})),
            unsubscribe=links.unsubscribe_headers(customer, ANY, "email"),
        )
        flash(_("Saved. Check your inbox: email subscriptions start once you confirm them."),
              "success")
    elif applied.recorded:
        flash(_("Your preferences are saved."), "success")
    else:
        flash(_("Nothing changed."), "info")
    return redirect(url_for("preferences.page"))


@bp.post("/preferences/contact")
@login_required
def contact() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    db = get_session()
    form = ContactForm()
    if form.validate_on_submit():
        region = "FR" if (customer.locale or "") == "fr" else None
        try:
            with transaction(db):
                prefs.update_contact_points(db, customer, phone=form.phone.data,
                                            postal_address=form.postal_address.data,
                                            region=region)
        except AccountError as exc:
            getattr(form, exc.field).errors.append(account_error(exc.code))
            db.refresh(customer)
        else:
            flash(_("Your contact details are saved."), "success")
            return redirect(url_for("preferences.page") + "#contact")
    catalog = catalog_service.get_catalog(db)
    return render_template("preferences/page.html",
                           **_page_context(customer, catalog, contact_form=form)), 422


def _parse_time(raw: str | None, field: str) -> time | None:
    if not raw:
        return None
    try:
        parsed = time.fromisoformat(raw)
    except ValueError as exc:
        raise AccountError("invalid_time", field) from exc
    if parsed.tzinfo is not None:  # quiet hours are in the person's own time zone
        raise AccountError("invalid_time", field)
    return parsed


@bp.post("/preferences/pressure")
@login_required
def pressure() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    db = get_session()
    if not PlainForm().validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
        return redirect(url_for("preferences.page"))
    rules = {}
    try:
        for ch in PRESSURE_CHANNELS:
            cap_raw = (request.form.get(f"cap_{ch}") or "").strip()
            # isdigit() alone lets "²" through (int() refuses it) and 5,000 digits (over
            # int()'s limit): only up to three ASCII digits can be a cap of 1 to 100.
            if cap_raw and not (cap_raw.isascii() and cap_raw.isdigit() and len(cap_raw) <= 3):
                raise AccountError("invalid_cap", f"cap_{ch}")
            rules[ch] = prefs.PressureRule(
                int(cap_raw) if cap_raw else None,
                _parse_time(request.form.get(f"quiet_start_{ch}"), f"quiet_{ch}"),
                _parse_time(request.form.get(f"quiet_end_{ch}"), f"quiet_{ch}"),
            )
        with transaction(db):
            prefs.set_contact_pressure(db, customer, request.form.get("timezone", ""), rules)
    except AccountError as exc:
        db.rollback()
        db.refresh(customer)
        catalog = catalog_service.get_catalog(db)
        return render_template("preferences/page.html", **_page_context(
            customer, catalog, errors={exc.field: account_error(exc.code)})), 422
    flash(_("How often we may contact you is saved."), "success")
    return redirect(url_for("preferences.page") + "#pressure")


@bp.get("/preferences/history")
@login_required
def history_page() -> str:
    customer = current_customer()
    assert customer is not None
    db = get_session()
    catalog = catalog_service.get_catalog(db)
    events = history(db, [customer.id])
    locale = str(get_locale() or "en")
    return render_template("preferences/history.html", events=events,
                           describe=lambda event: describe(event, catalog, locale))


@bp.route("/confirm/<token>", methods=["GET", "POST"])
def confirm(token: str) -> str | Response | tuple[str, int]:
    """Double opt-in. GET only shows a button: mail scanners follow links on their own."""
    try:
        data = links.read("confirm-consent", token)
    except TokenError:
        return render_template("errors/bad_link.html", message=_(
            "This confirmation link is not valid or has expired. Switch the subscription on "
            "again to get a new one.")), 400
    db = get_session()
    customer = find_by_public_id(db, str(data.get("c")))
    topics = [t for t in data.get("t", []) if isinstance(t, str)]
    if customer is None or customer.erased_at is not None:
        return render_template("errors/bad_link.html", message=_(
            "This confirmation link is not valid.")), 400
    catalog = catalog_service.get_catalog(db)
    form = PlainForm()
    if request.method == "POST" and form.validate_on_submit():
        with transaction(db):
            confirmed = prefs.confirm_pending_email(
                db, customer, catalog, topics,
                Proof("double_opt_in", f"customer:{customer.public_id}", request.remote_addr,
                      request.headers.get("User-Agent")))
        return render_template("preferences/confirmed.html",
                               topics=[catalog.topics[t] for t in confirmed])
    return render_template("preferences/confirm.html", form=form,
                           topics=[catalog.topics[t] for t in topics if t in catalog.topics])
