"""Browser notifications: the service worker, the opt-in panel (public ``/push`` page and the
preferences page), the JSON endpoints the panel calls, and the service worker's beacons.

The panel's JSON endpoints take the CSRF token in ``X-CSRFToken`` and answer problem+json
(never an HTML error page) so the script can show a precise message. Beacons carry no cookie
or token: what they know (an endpoint hash and a message id) is the credential, and they are
rate-limited per address.

The service worker's subscription renewal changes where someone's messages go, so it is held
to what subscribing asks: the CSRF token (the worker has no page to read it from, so it
fetches one from ``/push/csrf-token`` with the browser's cookies; another site cannot read
that answer) and ownership (the old subscription is the signed-in customer's, or was made in
this browser, by its device cookie). Knowing an endpoint is not enough. A renewal the server
refuses (say, a customer's session ended) is repaired by the panel's re-sync on the next visit
to the preferences or ``/push`` page, which posts the new subscription with the page's token.

Endpoints pass the destination rule (:mod:`portal.core.outbound`) when stored and again when the
worker sends: a push endpoint on a private or reserved network is refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    current_app,
    render_template,
    request,
)
from flask.blueprints import BlueprintSetupState
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_wtf.csrf import generate_csrf, validate_csrf
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response
from wtforms.validators import ValidationError

from portal.auth import ON_SIGN_IN, current_customer
from portal.core import ratelimit
from portal.core.db import get_session, utcnow
from portal.core.errors import problem
from portal.core.security import csrf
from portal.models.customer import Customer
from portal.push import jobs as push_worker
from portal.push import messages as push_messages
from portal.push import subscriptions as push_service
from portal.services.catalog import get_catalog
from portal.services.consent import Proof
from portal.services.decisions import CONTACT_RESOLVERS
from portal.web import transaction

bp = Blueprint("push", __name__)
log = logging.getLogger("carnet.push")

DEVICE_COOKIE = "carnet_device"
DEVICE_COOKIE_DAYS = 400  # the longest browsers keep a cookie
MAX_BODY_BYTES = 8 * 1024
MESSAGE_ID_RE = re.compile(r"pm_[A-Za-z0-9_-]{1,40}")
HASH_RE = re.compile(r"[0-9a-f]{64}")


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    app = state.app
    push_worker.check_subject(app.config["VAPID_SUBJECT"])  # a bad subject stops the start
    CONTACT_RESOLVERS[push_service.CHANNEL] = push_service.resolve_contacts
    if adopt_device_on_sign_in not in ON_SIGN_IN:
        ON_SIGN_IN.append(adopt_device_on_sign_in)
    app.jinja_env.globals["push_panel_context"] = panel_context
    push_worker.install(app)


# --- helpers ------------------------------------------------------------------------------------


def _locale() -> str:
    return str(get_locale() or "en")


def _proof(actor: str) -> Proof:
    return Proof(source="web_push", actor=actor, ip=request.remote_addr,
                 user_agent=request.headers.get("User-Agent"))


def _error(status: int, code: str, detail: str, field: str | None = None,
           reason: str | None = None) -> Response:
    extra: dict[str, Any] = {}
    if field:
        item = {"field": field, "code": code, "message": detail}
        if reason:
            item["reason"] = reason
        extra["errors"] = [item]
    return problem(status, code.replace("_", "-"), detail, detail, **extra)


def _input_error(exc: push_service.PushInputError) -> Response:
    if exc.code == "refused_destination":
        return _error(422, exc.code, _refused_message(exc.reason), exc.field, exc.reason)
    return _error(422, exc.code, str(exc), exc.field)


def _refused_message(reason: str | None) -> str:
    """What a person reads when their browser's push service address is refused."""
    if reason == "private_address":
        return _("This browser's push service address points to a private or reserved "
                 "network: notifications cannot be sent there.")
    if reason == "reserved_name":
        return _("This browser's push service address uses a host name kept for local "
                 "networks: notifications cannot be sent there.")
    if reason == "port":
        return _("This browser's push service address uses a port notifications cannot be "
                 "sent to.")
    if reason == "userinfo":
        return _("This browser's push service address must not contain a user name or "
                 "password.")
    return _("This browser's push service address is not valid.")


def _allow_private() -> bool:
    return bool(current_app.config["WEBHOOK_ALLOW_PRIVATE_NETWORKS"])


def _json_body() -> dict[str, Any] | Response:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return _error(413, "too_large", f"send at most {MAX_BODY_BYTES} bytes")
    if request.mimetype != "application/json":
        return _error(415, "unsupported_media_type", "send application/json")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        return _error(413, "too_large", f"send at most {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past the stack
        return _error(400, "malformed_json", "the body is not valid JSON")
    if not isinstance(data, dict):
        return _error(422, "type", "the body must be a JSON object", "body")
    return data


def _check_csrf() -> Response | None:
    try:
        validate_csrf(request.headers.get("X-CSRFToken", ""))
    except ValidationError:
        return _error(400, "csrf", "the CSRF token is missing or expired; reload the page")
    return None


def _throttle(name: str) -> Response | None:
    wait = ratelimit.hit(name, request.remote_addr or "-")
    if wait:
        response = _error(429, "rate_limited", f"too many requests; retry after {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    return None


def _accept_json(limit: str, *, csrf_header: bool) -> dict[str, Any] | Response:
    """The common door of the panel's JSON endpoints: the CSRF header (when the caller is a
    page), the rate limit, then the JSON object; an error answer if any of them fails."""
    refused = (_check_csrf() if csrf_header else None) or _throttle(limit)
    if refused is not None:
        return refused
    return _json_body()


def _device_hash() -> str | None:
    token = request.cookies.get(DEVICE_COOKIE)
    return push_service.sha256(token) if token and len(token) <= 100 else None


def panel_context() -> dict[str, Any]:
    """What the opt-in panel template needs, wherever it is included."""
    db = get_session()
    catalog = get_catalog(db)
    customer = current_customer()
    chosen: list[str] = []
    if customer is not None:
        chosen = push_service.chosen_topics(db, catalog, None, customer)
    else:
        device = _device_hash()
        subs = push_service.anonymous_device_subscriptions(db, device) if device else []
        if subs:
            latest = max(subs, key=lambda s: s.last_seen_at)
            chosen = push_service.chosen_topics(db, catalog, latest, None)
    return {
        "public_key": push_worker.public_key(current_app),
        "topics": push_service.web_push_topics(catalog),
        "chosen": chosen,
        "signed_in": customer is not None,
        "locale": _locale(),
    }


# --- pages ------------------------------------------------------------------------------------


@bp.get("/sw.js")
def service_worker() -> Response:
    """Served from the root so that its scope can be the whole site."""
    path = Path(current_app.static_folder or "static") / "sw.js"
    response = Response(path.read_bytes(), mimetype="application/javascript")
    response.headers["Service-Worker-Allowed"] = "/"
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/push")
def page() -> str:
    return render_template("push/page.html")


# --- the panel's JSON endpoints -----------------------------------------------------------------


@bp.get("/push/subscription")
def state() -> Response | dict[str, Any]:
    """What the server knows of this browser's subscription, so the script can re-sync."""
    endpoint_hash = request.args.get("endpoint_hash", "")
    if not HASH_RE.fullmatch(endpoint_hash):
        return _error(422, "invalid_hash", "endpoint_hash is a SHA-256 in hex", "endpoint_hash")
    db = get_session()
    sub = push_service.find_by_hash(db, endpoint_hash)
    customer = current_customer()
    if sub is None:
        return {"known": False}
    mine = sub.customer_id == (customer.id if customer else None)
    return {
        "known": True,
        "active": push_service.active(sub),
        "mine": mine,
        "keys_hash": push_service.sha256(f"{sub.p256dh}.{sub.auth}"),
        "topics": push_service.chosen_topics(db, get_catalog(db), sub, customer)
        if mine else [],
    }


@bp.post("/push/subscriptions")
@csrf.exempt  # checked below, to answer JSON instead of the HTML error page
def subscribe() -> Response:
    """Save this browser's subscription; with ``topics``, also set what it receives."""
    data = _accept_json("push_subscribe", csrf_header=True)
    if isinstance(data, Response):
        return data
    unknown = sorted(set(data) - {"subscription", "topics"})
    if unknown:
        return _error(422, "unknown_field", f"'{unknown[0][:40]}' is not a known field",
                      unknown[0][:40])
    db = get_session()
    catalog = get_catalog(db)
    try:
        sub_input = push_service.check_subscription(
            data.get("subscription"), allow_http=push_worker.allow_http(current_app),
            allow_private=_allow_private())
        topics = (push_service.check_topics(data["topics"], catalog)
                  if "topics" in data else None)
    except push_service.PushInputError as exc:
        return _input_error(exc)
    customer = current_customer()
    token = request.cookies.get(DEVICE_COOKIE)
    new_token = push_service.new_device_token() if customer is None and not token else None
    device_hash = push_service.sha256(new_token or token or "") if (new_token or token) else None
    try:
        with transaction(db):
            existing = push_service.find_by_endpoint(db, sub_input.endpoint)
            if customer is not None and existing is not None and existing.customer_id is None:
                push_service.adopt_device(db, catalog, customer, [existing],
                                          _proof(f"customer:{customer.public_id}"))
            sub, created = push_service.save_subscription(
                db, sub_input, customer=customer,
                device_hash=device_hash if customer is None else None,
                user_agent=request.headers.get("User-Agent"), locale=_locale())
            if topics is not None:
                actor = (f"customer:{customer.public_id}" if customer
                         else f"device:{sub.public_id}")
                push_service.set_topics(db, catalog, sub, customer, topics, _proof(actor))
            chosen = push_service.chosen_topics(db, catalog, sub, customer)
    except push_service.OwnedElsewhere:
        return _error(409, "signed_in_subscription", "this browser receives notifications "
                      "for an account: sign in to change them")
    response = Response(json.dumps({"subscription": sub.public_id, "topics": chosen,
                                    "created": created}),
                        status=201 if created else 200, mimetype="application/json")
    if new_token:
        response.set_cookie(DEVICE_COOKIE, new_token, max_age=DEVICE_COOKIE_DAYS * 86400,
                            httponly=True, samesite="Lax",
                            secure=bool(current_app.config["SESSION_COOKIE_SECURE"]))
    return response


@bp.delete("/push/subscriptions")
@csrf.exempt  # checked below
def unsubscribe() -> Response:
    """Stop notifications in this browser. Knowing the endpoint is enough: leaving is always
    allowed, and the consent choices stay as they are."""
    data = _accept_json("push_subscribe", csrf_header=True)
    if isinstance(data, Response):
        return data
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint or \
            len(endpoint) > push_service.MAX_ENDPOINT_LENGTH:
        return _error(422, "invalid_endpoint", "endpoint must be the subscription's URL",
                      "endpoint")
    db = get_session()
    with transaction(db):
        left = push_service.leave(db, endpoint)
    if not left:
        return _error(404, "not_found", "no active subscription with this endpoint", "endpoint")
    return Response(status=204)


@bp.get("/push/csrf-token")
def csrf_token() -> Response:
    """The CSRF token for the service worker, which has no page to read it from. Same-origin
    only: without CORS another site cannot read the answer, and it is never cached."""
    response = Response(json.dumps({"csrf_token": generate_csrf()}),
                        mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/push/subscriptions/renew")
@csrf.exempt  # checked below
def renew() -> Response:
    """``pushsubscriptionchange``: the browser replaced the subscription. The row keeps its
    owner and choices and takes the new endpoint and keys; only the caller's own row (signed
    in as its customer, or this browser's device cookie), and with the CSRF token."""
    data = _accept_json("push_subscribe", csrf_header=True)
    if isinstance(data, Response):
        return data
    old = data.get("old_endpoint")
    if not isinstance(old, str) or not old or len(old) > push_service.MAX_ENDPOINT_LENGTH:
        return _error(422, "invalid_endpoint", "old_endpoint must be the previous endpoint",
                      "old_endpoint")
    try:
        new = push_service.check_subscription(
            data.get("subscription"), allow_http=push_worker.allow_http(current_app),
            allow_private=_allow_private())
    except push_service.PushInputError as exc:
        return _input_error(exc)
    customer = current_customer()
    db = get_session()
    with transaction(db):
        renewed = push_service.renew(db, old, new, customer=customer,
                                     device_hash=_device_hash())
    if not renewed:
        # The same answer whether the row is missing or someone else's: no oracle.
        return _error(404, "not_found", "no subscription of this browser with this endpoint",
                      "old_endpoint")
    return Response(status=204)


@bp.post("/push/beacons")
@csrf.exempt  # sent by the service worker, without cookies; validated and rate-limited
def beacon() -> Response:
    data = _accept_json("push_beacon", csrf_header=False)
    if isinstance(data, Response):
        return data
    message, endpoint_hash, kind = (data.get("message"), data.get("subscription"),
                                    data.get("event"))
    if not isinstance(message, str) or not MESSAGE_ID_RE.fullmatch(message):
        return _error(422, "invalid_message", "message is a push message id", "message")
    if not isinstance(endpoint_hash, str) or not HASH_RE.fullmatch(endpoint_hash):
        return _error(422, "invalid_hash", "subscription is the endpoint's SHA-256 in hex",
                      "subscription")
    if kind not in ("displayed", "clicked"):
        return _error(422, "invalid_event", "event is displayed or clicked", "event")
    db = get_session()
    with transaction(db):
        found = push_messages.record_beacon(db, message, endpoint_hash, kind, utcnow())
    if not found:
        return _error(404, "not_found", "no delivery of this message to this subscription")
    return Response(status=204)


# --- sign-in -------------------------------------------------------------------------------------


def adopt_device_on_sign_in(customer: Customer) -> None:
    """``ON_SIGN_IN`` hook: the subscriptions this browser made before signing in become the
    customer's, and their topic choices join the customer's (most restrictive wins)."""
    device = _device_hash()
    if device is None:
        return
    db = get_session()
    try:
        with transaction(db):
            subs = push_service.anonymous_device_subscriptions(db, device)
            if subs:
                push_service.adopt_device(db, get_catalog(db), customer, subs,
                                          _proof(f"customer:{customer.public_id}"))
    except SQLAlchemyError:
        # Signing in must not fail for this. The subscriptions stay anonymous, and the panel's
        # next re-sync (on the preferences page every sign-in lands on) adopts them.
        log.exception("could not attach this browser's push subscriptions at sign-in")

