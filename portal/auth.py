"""Who is signed in. The signed cookie names a session kept on the server
(:mod:`portal.services.sign_ins`), which remembers how the person signed in (password, emailed
link, single-use confirmation link) and when, and ends at sign out, at a new password or
address, after :data:`SESSION_IDLE_MINUTES` without a request, or after the absolute lifetime."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, g, redirect, request, session, url_for

from portal.core.db import get_session, utcnow
from portal.models.customer import Customer, SignInSession
from portal.services import sign_ins
from portal.web import transaction

FRESH_LINK_SECONDS = int(sign_ins.CONFIRM_FRESH.total_seconds())
# Called with the customer after every sign-in (password, link, sign-up confirmation), so that
# other parts can attach what the visitor did before signing in (web push device choices).
ON_SIGN_IN: list[Callable[[Customer], None]] = []


def limits() -> sign_ins.Limits:
    return sign_ins.limits_from(current_app.config, current_app.permanent_session_lifetime)


def _keep_locale_only() -> None:
    locale = session.get("locale")
    session.clear()
    if locale:
        session["locale"] = locale


def sign_in(customer: Customer, method: str) -> None:
    """Start a session for ``customer`` in this browser (ending the one it had, if any)."""
    db = get_session()
    previous = session.get("sid")
    with transaction(db):
        if previous:
            row = sign_ins.find(db, str(previous))
            if row is not None:
                db.delete(row)
        key, row = sign_ins.start(db, customer, method, request.headers.get("User-Agent"),
                                  limits())
    _keep_locale_only()
    session["sid"] = key
    session["cid"] = customer.public_id
    session["epoch"] = customer.auth_epoch
    session.permanent = method == "password"
    g.customer = customer
    g.sign_in = row
    for hook in ON_SIGN_IN:
        hook(customer)


def sign_out() -> None:
    """End this browser's session, on the server too: a copy of the cookie stops working."""
    key = session.get("sid")
    if key:
        db = get_session()
        with transaction(db):
            row = sign_ins.find(db, str(key))
            if row is not None:
                db.delete(row)
    _keep_locale_only()
    g.customer = None
    g.sign_in = None


def load_customer() -> None:
    g.customer = None
    g.sign_in = None
    cid, key = session.get("cid"), session.get("sid")
    # The API and the PassKit web service authenticate otherwise and never read the signed-in
    # customer. Loading it would also leave a read transaction open, and their views begin
    # their own (a browser signed in to the portal calling the API got a 500).
    if not cid or request.path.startswith(("/api/", "/wallet/")):
        return
    db = get_session()
    found = sign_ins.resume(db, str(key), str(cid)) if key else None
    row, customer = found if found is not None else (None, None)
    now = utcnow()
    if row is None or customer is None or customer.erased_at is not None or \
            customer.auth_epoch != session.get("epoch") or \
            sign_ins.is_expired(row, limits(), now):
        if row is not None:
            with transaction(db):
                db.delete(row)
        _keep_locale_only()
        return
    if sign_ins.needs_touch(row, now):
        with transaction(db):
            sign_ins.touch(db, row, now)
    g.customer = customer
    g.sign_in = row


def current_customer() -> Customer | None:
    return g.get("customer")


def current_sign_in() -> SignInSession | None:
    return g.get("sign_in")


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_customer() is None:
            return redirect(url_for("account.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped
