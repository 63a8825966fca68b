"""One-click unsubscribe (RFC 8058). GET only shows a button and changes nothing: mailbox
providers and scanners fetch links on their own. POST, from our page or from a mailbox
provider (``List-Unsubscribe=One-Click``, no cookies, no CSRF token), withdraws."""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask_babel import gettext as _
from werkzeug.wrappers import Response

from portal.core.db import get_session
from portal.core.security import csrf
from portal.core.tokens import TokenError
from portal.models.consent import ANY
from portal.services import catalog as catalog_service
from portal.services.accounts import find_by_public_id
from portal.services.consent import ConsentError, Proof, record_consent
from portal.web import links, transaction
from portal.web.forms import PlainForm

bp = Blueprint("unsubscribe", __name__)


def _bad() -> tuple[str, int]:
    return render_template("errors/bad_link.html", message=_(
        "This unsubscribe link is not valid. It may have been cut or changed. You can sign in "
        "or ask for a link to manage your preferences.")), 400


@bp.route("/u/<token>", methods=["GET", "POST"])
@csrf.exempt  # the signed token is the credential; RFC 8058 POSTs carry no cookie or form token
def page(token: str) -> str | Response | tuple[str, int]:
    try:
        data = links.read("unsubscribe", token)
    except TokenError:
        return _bad()
    db = get_session()
    customer = find_by_public_id(db, str(data.get("c")))
    topic_key, channel = str(data.get("t")), str(data.get("ch"))
    catalog = catalog_service.get_catalog(db)
    topic = catalog.get(topic_key) if topic_key != ANY else None
    if customer is None or (topic_key != ANY and topic is None):
        return _bad()
    scope = {"topic": topic, "channel": channel}
    if request.method == "GET":
        return render_template("unsubscribe/page.html", form=PlainForm(), **scope)
    one_click = request.form.get("List-Unsubscribe") == "One-Click"
    if customer.erased_at is None:
        try:
            with transaction(db):
                record_consent(
                    db, customer, topic_key, channel, "withdrawn",
                    Proof("one_click" if one_click else "link", "recipient",
                          request.remote_addr, request.headers.get("User-Agent")),
                    catalog=catalog)
        except ConsentError:
            return _bad()
    if one_click:
        return Response(status=200)
    return render_template("unsubscribe/done.html", **scope)
