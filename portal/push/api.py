"""Browser notifications (web push) for sending systems: send a message to a topic's
subscribers, then follow what became of it."""

from __future__ import annotations

from typing import Any

from flask import g

from portal.api import api
from portal.api.common import obj
from portal.api.core import not_found, unprocessable
from portal.api.schema import URL_CHAR, Int, Obj, Str
from portal.api.schemas import Audience, Topic
from portal.core.db import begin_write, get_session
from portal.core.i18n import LOCALES
from portal.push import messages as push_messages
from portal.push.webpush import MAX_TTL_SECONDS, URGENCIES
from portal.services.catalog import get_catalog

URL_PATTERN = f"(https?://{URL_CHAR}+|/{URL_CHAR}*)"

Title = Str(min_length=1, max_length=200, description="Notification title.")
Body = Str(max_length=1000, description="Notification text.")
Url = Str(min_length=1, max_length=2000, pattern=URL_PATTERN,
          description="Opened on click: an http(s) URL or a path on this site.")
Icon = Str(min_length=1, max_length=2000, pattern=URL_PATTERN, description="Icon URL.")
Variant = Obj({"title": Title, "body": Body, "url": Url, "icon": Icon}, name="PushText",
              description="Fields given replace the defaults for people using this language.")
MessageRequest = Obj({
    "topic": Topic,
    "audience": Audience(
        "PushAudience",
        'Every browser subscribed to the topic, signed-in or not ("all"), or the browsers of '
        "the customers listed. Each person is decided on channel web_push."),
    "title": Title,
    "body": Body,
    "url": Url,
    "icon": Icon,
    "localized": Obj({loc: Variant for loc in LOCALES},
                     description="Other languages; each browser gets its person's language."),
    "ttl": Int(minimum=0, maximum=MAX_TTL_SECONDS,
               description="Seconds the push service keeps the message for an offline "
               "browser; default 86400."),
    "urgency": Str(enum=URGENCIES, description="RFC 8030 Urgency; default normal."),
    "collapse_topic": Str(min_length=1, max_length=32, pattern=r"[A-Za-z0-9_-]{1,32}",
                          description="RFC 8030 Topic: a newer message with the same value "
                          "replaces one still waiting on the push service."),
}, required=("topic", "audience", "title"), name="PushMessageRequest")

COUNTS = obj(
    queued={"type": "integer", "description": "Waiting (including retries and quiet hours)."},
    sent={"type": "integer"}, failed={"type": "integer"},
    expired={"type": "integer", "description": "The subscription was gone (404/410), or its "
             "endpoint is on a private or reserved network (refused, never called)."},
    skipped={"type": "integer", "description": "Not consented; see skipped_reasons."},
    displayed={"type": "integer", "description": "Shown by the browser (beacon)."},
    clicked={"type": "integer", "description": "Clicked (beacon)."},
    unreachable={"type": "integer", "description": "Customers listed without a subscribed "
                 "browser."},
)
REPORT = obj(
    id={"type": "string"}, topic={"type": "string"},
    status={"enum": ["fanning_out", "sending", "done"]},
    created_at={"type": "string", "format": "date-time"},
    counts=COUNTS,
    skipped_reasons={"type": "object", "additionalProperties": {"type": "integer"},
                     "description": "Per decision reason (withdrawn, not_consented...)."},
)


@api.op("POST", "/push/messages", summary="Send a browser notification", tag="Web push",
        scopes=("push:send",), body=MessageRequest,
        responses={202: ("Accepted; follow it with GET /push/messages/{id}.",
                         obj(id={"type": "string"}))})
def send_push_message(body: dict[str, Any]) -> Any:
    """Every browser in the audience is decided by the consent precedence on channel
    ``web_push`` for ``topic``: a customer's by their choices, an anonymous browser's by the
    choices made in it. The notification, in each language variant, must fit one encrypted
    push record (3993 bytes of JSON); a larger one is refused here with 422. Delivery
    happens in the worker, not in this request; while the server has no VAPID key the
    deliveries wait, and fail once their ``ttl`` has passed."""
    session = get_session()
    try:
        with begin_write(session):
            message = push_messages.create_message(session, get_catalog(session), body,
                                                   api_key_id=g.api_key.id)
            return {"id": message.public_id}, 202
    except push_messages.MessageError as exc:
        return unprocessable(exc.code, str(exc), exc.field)


@api.op("GET", "/push/messages/<message_id>", summary="What became of a browser notification",
        tag="Web push", scopes=("push:send",),
        responses={200: ("Counts per status, displays and clicks.", REPORT)})
def push_message_report(message_id: str) -> Any:
    session = get_session()
    with session.begin():
        message = push_messages.find(session, message_id)
        if message is None:
            return not_found("no such push message", "message_id")
        return push_messages.summary(session, message)
