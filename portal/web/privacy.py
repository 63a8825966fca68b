"""Download my data; delete my account."""

from __future__ import annotations

import json

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_babel import gettext as _

from portal.auth import current_customer, login_required, sign_out
from portal.core.db import get_session
from portal.services import catalog as catalog_service
from portal.services.consent import Proof
from portal.services.privacy import erase_customer, export_data, hooks_of
from portal.web import transaction
from portal.web.account import needs_password_message, render_settings, sensitive_allowed
from portal.web.forms import DeleteForm, ExportForm

bp = Blueprint("privacy", __name__)


@bp.post("/account/export")
@login_required
def export() -> Response:
    customer = current_customer()
    assert customer is not None
    form = ExportForm()
    if not form.validate_on_submit():
        flash(_("The form expired. Please try again."), "error")
        return redirect(url_for("account.settings"))  # type: ignore[return-value]
    if not sensitive_allowed(form.export_password.data):
        form.export_password.errors.append(needs_password_message())
        html, status = render_settings(422, export_form=form)
        return Response(html, status=status, mimetype="text/html")
    db = get_session()
    data = export_data(db, customer, catalog_service.get_catalog(db),
                       hooks_of(current_app.extensions).exporters)
    body = json.dumps(data, indent=2, ensure_ascii=False)
    return Response(body, mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="carnet-{customer.public_id}.json"',
        "Cache-Control": "no-store",
    })


@bp.route("/account/delete", methods=["GET", "POST"])
@login_required
def delete() -> str | Response | tuple[str, int]:
    customer = current_customer()
    assert customer is not None
    form = DeleteForm()
    if form.validate_on_submit():
        if not sensitive_allowed(form.current_password.data):
            form.current_password.errors.append(needs_password_message())
        else:
            db = get_session()
            with transaction(db):
                erase_customer(db, customer, Proof(
                    "portal", f"customer:{customer.public_id}", request.remote_addr,
                    request.headers.get("User-Agent")), catalog_service.get_catalog(db),
                    hooks_of(current_app.extensions).erasers)
            sign_out()
            return render_template("account/deleted.html")
    return render_template("account/delete.html", form=form), (422 if form.errors else 200)
