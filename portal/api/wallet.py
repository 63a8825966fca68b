"""Messages on the loyalty cards in people's wallets (Google Wallet and Apple Wallet)."""

from __future__ import annotations

from typing import Any

from flask import g

from portal.api import api
from portal.api.common import obj
from portal.api.core import not_found, unprocessable
from portal.api.schema import Obj, Str
from portal.api.schemas import Audience, Topic
from portal.core.db import begin_write, get_session
from portal.services import wallet_messages
from portal.services.catalog import get_catalog

Header = Str(min_length=1, max_length=120, description="Card message title.")
Body = Str(min_length=1, max_length=1000, description="Card message text.")
Text = Obj({"header": Header, "body": Body}, required=("header", "body"), name="WalletText")
MessageRequest = Obj({
    "topic": Topic,
    "audience": Audience(
        "WalletAudience",
        'Everyone with a card on Google or Apple ("all"), or the customers listed. Each person '
        "is decided on channel wallet."),
    "header": Header,
    "body": Body,
    "localized": Obj({"fr": Text}, description="Other languages; the member's language is "
                     "shown when present."),
}, required=("topic", "audience", "header", "body"), name="WalletMessageRequest")

COUNTS = obj(queued={"type": "integer"}, sent={"type": "integer"}, failed={"type": "integer"},
             skipped={"type": "object", "additionalProperties": {"type": "integer"},
                      "description": "Per reason (apple_unavailable...)."},
             denied={"type": "object", "additionalProperties": {"type": "integer"},
                     "description": "Per decision reason (withdrawn, no_contact_point...)."})
REPORT = obj(
    id={"type": "string"}, topic={"type": "string"},
    status={"enum": ["accepted", "delivering", "done"]},
    created_at={"type": "string", "format": "date-time"},
    recipients={"type": "integer", "description": "People decided so far."},
    platforms=obj(google=COUNTS, apple=COUNTS, none={
        **COUNTS, "description": "People without a saved card."}),
)


@api.op("POST", "/wallet/messages", summary="Send a message to wallet cards", tag="Wallet",
        scopes=("push:send",), body=MessageRequest,
        responses={202: ("Accepted; follow it with GET /wallet/messages/{id}.",
                         obj(id={"type": "string"}))})
def send_message(body: dict[str, Any]) -> Any:
    """Each person is asked of the consent precedence on channel ``wallet`` for ``topic``;
    their Google card gets the message (with a notification while its quota allows), their
    Apple card gets it as news on the back with an update push. Delivery happens in the
    worker, not in this request."""
    session = get_session()
    try:
        with begin_write(session):
            message = wallet_messages.create_message(
                session, get_catalog(session), topic=body["topic"], header=body["header"],
                body=body["body"], localized=body.get("localized") or {},
                audience=body["audience"], actor=f"api:{g.api_key.name}",
                api_key_id=g.api_key.id)
            return {"id": message.public_id}, 202
    except wallet_messages.WalletMessageError as exc:
        return unprocessable(exc.code, str(exc), exc.field)


@api.op("GET", "/wallet/messages/<message_id>", summary="What became of a wallet message",
        tag="Wallet", scopes=("push:send",),
        responses={200: ("Counts per platform and status, denials per reason.", REPORT)})
def message_report(message_id: str) -> Any:
    session = get_session()
    with session.begin():
        message = wallet_messages.find(session, message_id)
        if message is None:
            return not_found("no such wallet message", "message_id")
        return wallet_messages.summary(session, message)
