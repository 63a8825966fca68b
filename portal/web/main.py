"""Home, language switcher, health."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from portal.auth import current_customer
from portal.core.db import get_session
from portal.core.i18n import LOCALES
from portal.web import local_path, transaction
from portal.web.forms import PlainForm

bp = Blueprint("main", __name__)


@bp.get("/")
def index() -> str | Response:
    if current_customer() is not None:
        return redirect(url_for("preferences.page"))
    return render_template("main/index.html")


@bp.post("/locale")
def set_locale() -> Response:
    form = PlainForm()
    locale = request.form.get("locale", "")
    if form.validate_on_submit() and locale in LOCALES:
        session["locale"] = locale
        customer = current_customer()
        if customer is not None:
            with transaction(get_session()):
                customer.locale = locale
    return redirect(local_path(request.form.get("next")) or url_for("main.index"))


@bp.get("/healthz")
def health() -> dict[str, str]:
    return {"status": "ok"}
