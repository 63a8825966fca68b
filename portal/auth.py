"""Who is signed in. A session remembers how (password or emailed link) and when, so that
sensitive changes can ask for the password or a fresh link."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import g, redirect, request, session, url_for

from portal.db import get_session
from portal.models.customer import Customer
from portal.services.accounts import find_by_public_id

FRESH_LINK_SECONDS = 15 * 60
# Called with the customer after every sign-in (password, link, sign-up confirmation), so that
# other parts can attach what the visitor did before signing in (web push device choices).
ON_SIGN_IN: list[Callable[[Customer], None]] = []


def sign_in(customer: Customer, method: str) -> None:
    locale = session.get("locale")
    session.clear()
    session["cid"] = customer.public_id
    session["epoch"] = customer.auth_epoch
    session["method"] = method
    session["at"] = int(time.time())
    if locale:
        session["locale"] = locale
    session.permanent = method == "password"
    g.customer = customer
    for hook in ON_SIGN_IN:
        hook(customer)


def sign_out() -> None:
    locale = session.get("locale")
    session.clear()
    if locale:
        session["locale"] = locale
    g.customer = None


def load_customer() -> None:
    g.customer = None
    cid = session.get("cid")
    # The API and the PassKit web service authenticate otherwise and never read the signed-in
    # customer. Loading it would also leave a read transaction open, and their views begin
    # their own (a browser signed in to the portal calling the API got a 500).
    if not cid or request.path.startswith(("/api/", "/wallet/")):
        return
    customer = find_by_public_id(get_session(), cid)
    if customer is None or customer.erased_at is not None or \
            customer.auth_epoch != session.get("epoch"):
        session.pop("cid", None)
        return
    g.customer = customer


def current_customer() -> Customer | None:
    return g.get("customer")


def recently_authenticated() -> bool:
    """Signed in with a password this session, or with a link in the last few minutes."""
    if session.get("method") == "password":
        return True
    return time.time() - float(session.get("at", 0)) < FRESH_LINK_SECONDS


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_customer() is None:
            return redirect(url_for("account.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped
