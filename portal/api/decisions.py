"""Decisions, batch decisions, reported dispatches and audiences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Response, stream_with_context
from flask import request as flask_request

from portal.api import api
from portal.api.common import (
    DATE_TIME,
    DECISION_SCHEMA,
    at_or_now,
    catalog,
    decision_json,
    default_timezone,
    obj,
)
from portal.api.core import Admission, fast_json, not_found, timed, unprocessable
from portal.api.schema import Int, Obj, Str
from portal.api.schemas import BatchRequest, Channel, DecisionRequest, DispatchRequest
from portal.core.db import begin_write, get_session, reads, utcnow
from portal.models.catalog import CHANNELS
from portal.models.consent import Dispatch
from portal.services import audiences, identity

NDJSON = "application/x-ndjson"


@api.op("POST", "/decisions", summary="May we send this topic to this person on this "
        "channel now?", tag="Decisions", scopes=("decisions:read",), body=DecisionRequest,
        read_only=True, key_in_view=True,
        responses={200: ("The decision, with its evidence.", DECISION_SCHEMA)})
def decision(body: dict[str, Any], admission: Admission) -> Any:
    """Answers send, deny or defer with a stable reason code and the consent event that
    justifies it. ``explain`` adds the rules evaluated, in order."""
    # The caller's key is read in the decision's own statement: one round trip in all, on a
    # connection of its own on PostgreSQL (no ORM Session: see portal.core.db.reads).
    known = catalog()
    with reads() as reader:
        result, key = identity.decide_about(
            reader, known, body["customer"], body["topic"], body["channel"],
            at_or_now(body.get("at")), default_timezone=default_timezone(),
            guard=admission.guard, guard_params=admission.guard_params)
    denied = admission.admit(key)
    if denied is not None:
        return denied
    return fast_json(decision_json(result, body.get("explain", False)))


@api.op("POST", "/decisions/batch", summary="Up to 10,000 decisions in one call",
        tag="Decisions", scopes=("decisions:read",), body=BatchRequest, read_only=True,
        responses={200: ("Results in the order of the items.", obj(
            results={"type": "array", "items": DECISION_SCHEMA}))})
def batch(body: dict[str, Any]) -> Any:
    """Computed with a constant number of queries whatever the number of items."""
    session = get_session()
    items = body["items"]
    with session.begin(), timed("decide"):
        results = identity.decide_batch(
            session, catalog(),
            [(i["customer"], i["topic"], i["channel"]) for i in items],
            at_or_now(body.get("at")), default_timezone=default_timezone())
    explain = body.get("explain", False)
    return fast_json({"results": [decision_json(r, explain) for r in results]})


@api.op("POST", "/dispatches", summary="Report a message as sent (feeds the weekly cap)",
        tag="Decisions", scopes=("decisions:read",), body=DispatchRequest,
        responses={201: ("Recorded.", obj(id={"type": "integer"}))})
def dispatch(body: dict[str, Any]) -> Any:
    session = get_session()
    with begin_write(session):
        customer = identity.resolve(session, body["customer"])
        if customer is None:
            return unprocessable("unknown_customer", "no such customer", "customer")
        row = Dispatch(customer_id=customer.id, topic_key=body["topic"],
                       channel=body["channel"], sent_at=body.get("sent_at") or utcnow(),
                       sender=body["sender"], message_id=body.get("message_id"))
        session.add(row)
        session.flush()
    return {"id": row.id}, 201


MEMBER = obj(customer={"type": "string"}, contact={"type": ["object", "null"]},
             reason={"type": "string"}, locale={"type": ["string", "null"]})
AudienceQuery = Obj({
    "limit": Int(minimum=1, maximum=5000, description="Page size (JSON); default 500."),
    "cursor": Str(min_length=1, max_length=40, description="next_cursor of the last page."),
}, name="AudienceQuery")


@api.op("GET", "/audiences/<topic>/<channel>", summary="Everyone who may receive a topic "
        "on a channel now", tag="Audiences", scopes=("audiences:read",), query=AudienceQuery,
        path={"channel": Channel},
        problems={404: "No such topic.", 422: "Also channel_not_offered (the topic is not "
                  "offered on this channel), invalid_cursor."},
        responses={200: ("A page of members; with Accept: application/x-ndjson, every "
                         "member as one JSON line, streamed.", obj(
                             topic={"type": "string"}, channel={"type": "string"},
                             at=DATE_TIME, items={"type": "array", "items": MEMBER},
                             next_cursor={"type": ["string", "null"]}))},
        media={NDJSON: "One member per line: {customer, contact, reason, locale}."})
def audience(topic: str, channel: str, query: dict[str, Any]) -> Any:
    session = get_session()
    known = catalog()
    info = known.get(topic)
    if info is None:
        return not_found(f"no topic '{topic}'", "topic")
    if channel not in CHANNELS or channel not in info.channels:
        return unprocessable("channel_not_offered", f"'{topic}' is not offered on this "
                             "channel", "channel")
    after = audiences.cursor_id(session, query.get("cursor"))
    if after is None:
        return unprocessable("invalid_cursor", "unknown cursor", "cursor")
    at = utcnow()
    best = flask_request.accept_mimetypes.best_match(["application/json", NDJSON])
    if best == NDJSON:
        def lines() -> Iterator[bytes]:
            yield from audiences.ndjson(session, known, info, channel, at, after,
                                        default_timezone=default_timezone())
            session.rollback()

        return Response(stream_with_context(lines()), mimetype=NDJSON)
    members, next_cursor = audiences.page(session, known, info, channel, at, after,
                                          query.get("limit", 500),
                                          default_timezone=default_timezone())
    session.rollback()
    return {"topic": topic, "channel": channel, "at": at.isoformat(),
            "items": [m.as_json() for m in members], "next_cursor": next_cursor}
