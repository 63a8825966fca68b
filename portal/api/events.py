"""The change feed and webhook endpoints."""

from __future__ import annotations

from typing import Any

from portal.api import api
from portal.api.common import DATE_TIME, obj
from portal.api.core import config, not_found, unprocessable
from portal.api.schema import Int, Obj, Str
from portal.api.schemas import WebhookCreate
from portal.core.db import begin_write, get_session
from portal.core.outbound import RefusedDestination
from portal.outbox import feed
from portal.services import webhooks

EventsQuery = Obj({
    "after": Str(min_length=1, max_length=40, description="next_cursor of the last page."),
    "limit": Int(minimum=1, maximum=1000, description="Default 100."),
}, name="EventsQuery")
EVENT = obj(id={"type": "string"}, sequence={"type": "integer"}, type={"type": "string"},
            customer={"type": ["string", "null"]}, occurred_at={"type": "string"},
            data={"type": "object"})
WEBHOOK = obj(id={"type": "string"}, url={"type": "string"},
              events={"type": "array", "items": {"type": "string"}},
              description={"type": ["string", "null"]}, created_at=DATE_TIME,
              status={"enum": ["active", "failing", "disabled"]},
              failures={"type": "integer"},
              next_attempt_at={"type": ["string", "null"], "format": "date-time"},
              disabled_reason={"type": ["string", "null"]}, cursor={"type": "string"},
              secret={"type": "string", "description": "Only in the creation answer."},
              optional=("secret",))
DELIVERY = obj(
    id={"type": "integer"}, event={"type": "integer"}, type={"type": "string"},
    attempt={"type": "integer", "description": "1, or the failure's rank in a row."},
    ok={"type": "boolean"},
    outcome={"enum": list(webhooks.OUTCOMES), "description": (
        "`delivered` (2xx); `http_error` (another status, redirects included: they are "
        "not followed); `timeout`; `connection_failed`; `unresolvable` (the name does not "
        "resolve); `refused_destination` (the URL or the address its name resolves to is "
        "private, reserved or local); `invalid_url`; `error` (anything else).")},
    status_code={"type": ["integer", "null"], "description": "The receiver's HTTP status."},
    error={"type": ["string", "null"],
           "description": "A fixed sentence per outcome, never the text of a network error."},
    duration_ms={"type": "integer"}, attempted_at=DATE_TIME,
    next_attempt_at={"type": ["string", "null"], "format": "date-time"})


@api.op("GET", "/events", summary="The change feed, in commit order", tag="Events",
        scopes=("events:read",), query=EventsQuery,
        responses={200: ("Events after the cursor.", obj(
            events={"type": "array", "items": EVENT}, next_cursor={"type": "string"}))})
def events(query: dict[str, Any]) -> Any:
    """Keep ``next_cursor`` and pass it as ``after``: no event is skipped or repeated, even
    with many writers. An empty page means nothing new yet; poll again later."""
    try:
        after = feed.Cursor.decode(query.get("after"))
    except feed.CursorError as exc:
        return unprocessable("invalid_cursor", str(exc), "after")
    session = get_session()
    with session.begin():
        rows, cursor = feed.read(session, after, query.get("limit", 100))
        return {"events": feed.as_json(session, rows), "next_cursor": cursor.encode()}


@api.op("POST", "/webhooks", summary="Subscribe an endpoint to changes", tag="Webhooks",
        scopes=("webhooks:manage",), body=WebhookCreate,
        responses={201: ("The endpoint, with its signing secret (shown once).", WEBHOOK)})
def create_webhook(body: dict[str, Any]) -> Any:
    """Deliveries start with the changes after this call, in order, signed with
    ``Carnet-Signature``. The URL must be http(s) on port 80, 443 or 1024 and above, without
    user name or password, and name a public destination: private, loopback, link-local and
    reserved addresses (in any notation) and local names are refused with 422, and checked
    again, after resolving the name, at every delivery. The stored URL is normalised."""
    session = get_session()
    with begin_write(session):
        try:
            hook = webhooks.create(
                session, body["url"], body["events"], body.get("description"),
                allow_private=bool(config("WEBHOOK_ALLOW_PRIVATE_NETWORKS")))
        except RefusedDestination as refused:
            return unprocessable(refused.reason, str(refused), "url")
        return webhooks.as_json(hook, with_secret=True), 201


@api.op("GET", "/webhooks", summary="Endpoints", tag="Webhooks", scopes=("webhooks:manage",),
        responses={200: ("Every endpoint.", obj(items={"type": "array", "items": WEBHOOK}))})
def list_webhooks() -> Any:
    session = get_session()
    with session.begin():
        return {"items": [webhooks.as_json(h) for h in webhooks.list_all(session)]}


@api.op("GET", "/webhooks/<webhook_id>", summary="One endpoint", tag="Webhooks",
        scopes=("webhooks:manage",), responses={200: ("The endpoint.", WEBHOOK)})
def get_webhook(webhook_id: str) -> Any:
    session = get_session()
    with session.begin():
        hook = webhooks.find(session, webhook_id)
        return webhooks.as_json(hook) if hook else not_found("no such webhook", "webhook_id")


@api.op("DELETE", "/webhooks/<webhook_id>", summary="Stop and remove an endpoint",
        tag="Webhooks", scopes=("webhooks:manage",), responses={204: ("Removed.", None)})
def delete_webhook(webhook_id: str) -> Any:
    from portal.core.db import utcnow

    session = get_session()
    with begin_write(session):
        hook = webhooks.find(session, webhook_id)
        if hook is None:
            return not_found("no such webhook", "webhook_id")
        hook.deleted_at = utcnow()
    return "", 204


@api.op("POST", "/webhooks/<webhook_id>/enable", summary="Re-enable a disabled endpoint",
        tag="Webhooks", scopes=("webhooks:manage",), responses={200: ("The endpoint.", WEBHOOK)})
def enable_webhook(webhook_id: str) -> Any:
    """Delivery resumes where it stopped: nothing is lost while an endpoint is disabled."""
    session = get_session()
    with begin_write(session):
        hook = webhooks.find(session, webhook_id)
        if hook is None:
            return not_found("no such webhook", "webhook_id")
        webhooks.enable(hook)
        return webhooks.as_json(hook)


DeliveriesQuery = Obj({"limit": Int(minimum=1, maximum=500)}, name="DeliveriesQuery")


@api.op("GET", "/webhooks/<webhook_id>/deliveries", summary="Recent delivery attempts",
        tag="Webhooks", scopes=("webhooks:manage",), query=DeliveriesQuery,
        responses={200: ("Newest first.", obj(items={"type": "array", "items": DELIVERY}))})
def deliveries(webhook_id: str, query: dict[str, Any]) -> Any:
    """Each attempt with its outcome class and the receiver's status: failures count toward
    disabling the endpoint, whatever their class."""
    session = get_session()
    with session.begin():
        hook = webhooks.find(session, webhook_id)
        if hook is None:
            return not_found("no such webhook", "webhook_id")
        rows = webhooks.deliveries(session, hook, query.get("limit", 100))
        return {"items": [webhooks.delivery_json(d) for d in rows]}
