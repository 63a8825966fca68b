"""What senders report back or need per message: suppressions, inbound SMS, unsubscribe links."""

from __future__ import annotations

from typing import Any

from portal.api import api
from portal.api.common import DATE_TIME, obj
from portal.api.core import not_found, unprocessable
from portal.api.schemas import InboundSms, SuppressionRequest, UnsubscribeLinkRequest
from portal.core.db import begin_write, get_session
from portal.models.consent import Suppression
from portal.models.customer import Customer
from portal.services import identity, suppressions
from portal.services.catalog import get_catalog

RFC8058: dict[str, Any] = {
    "type": "object", "required": ["List-Unsubscribe", "List-Unsubscribe-Post"],
    "properties": {"List-Unsubscribe": {"type": "string"},
                   "List-Unsubscribe-Post": {"const": "List-Unsubscribe=One-Click"}}}
ADDRESS_KIND = {"email": "email", "sms": "phone", "voice": "phone"}
SUPPRESSION = obj(id={"type": "integer"}, customer={"type": "string"},
                  channel={"type": "string"}, reason={"type": "string"},
                  address={"type": ["string", "null"]}, source={"type": "string"},
                  created_at=DATE_TIME, lifted_at={"type": ["string", "null"],
                                                   "format": "date-time"})


@api.op("POST", "/suppressions", summary="Suppress a channel after a bounce, complaint or "
        "STOP", tag="Suppressions", scopes=("consent:write",), body=SuppressionRequest,
        responses={201: ("The suppression.", SUPPRESSION)})
def suppress(body: dict[str, Any]) -> Any:
    """Name the person by ``customer`` or by the ``address`` that bounced."""
    channel = body["channel"]
    if "address" in body:
        kind = ADDRESS_KIND.get(channel)
        if kind is None:
            return unprocessable("address_not_applicable", f"'{channel}' has no address; "
                                 "name the customer", "address")
        ref: dict[str, Any] = {kind: body["address"]}
    else:
        ref = body["customer"]
    session = get_session()
    with begin_write(session):
        customer = identity.resolve(session, ref)
        if customer is None:
            return unprocessable("unknown_customer", "no customer with this address",
                                 "address" if "address" in body else "customer")
        row = suppressions.add(session, customer, channel, body["reason"],
                               body.get("address"))
        return suppressions.to_json(row, customer), 201


@api.op("DELETE", "/suppressions/<int:suppression_id>", summary="Lift a suppression",
        tag="Suppressions", scopes=("consent:write",),
        responses={200: ("The lifted suppression.", SUPPRESSION)})
def lift(suppression_id: int) -> Any:
    session = get_session()
    with begin_write(session):
        row = session.get(Suppression, suppression_id) if suppression_id < 2**63 else None
        if row is None:
            return not_found("no such suppression", "suppression_id")
        customer = session.get(Customer, row.customer_id)
        assert customer is not None
        return suppressions.to_json(suppressions.lift(session, row, customer), customer)


@api.op("GET", "/customers/<customer_id>/suppressions", summary="Active suppressions",
        tag="Suppressions", scopes=("consent:write", "decisions:read"),
        responses={200: ("Active suppressions, the merged records' included.", obj(
            items={"type": "array", "items": SUPPRESSION}))})
def list_suppressions(customer_id: str) -> Any:
    session = get_session()
    with session.begin():
        customer = identity.by_public_id(session, customer_id)
        if customer is None:
            return not_found("no such customer", "customer")
        rows = suppressions.active_for(session, [customer.id])
        return {"items": [suppressions.to_json(r, customer) for r in rows]}


@api.op("POST", "/inbound/sms", summary="An SMS reply from a person (STOP keywords)",
        tag="Suppressions", scopes=("consent:write",), body=InboundSms,
        responses={200: ("What was understood.", obj(
            understood={"type": ["string", "null"]}, action={"type": "string"},
            customer={"type": ["string", "null"]}))})
def inbound_sms(body: dict[str, Any]) -> Any:
    """STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPT OUT, ARRET (alone or leading
    the message, any case) withdraw every SMS message, recorded with source ``sms``."""
    session = get_session()
    with begin_write(session):
        customer = identity.resolve(session, {"phone": body["from"]})
        result = suppressions.inbound_sms(session, get_catalog(session), customer,
                                          body["from"], body["body"])
        return {"understood": result.understood, "action": result.action,
                "customer": customer.public_id if customer else None}


@api.op("POST", "/unsubscribe-links", summary="Unsubscribe link and RFC 8058 headers for a "
        "message", tag="Decisions", scopes=("links:write",), body=UnsubscribeLinkRequest,
        responses={200: ("The link and headers.", obj(url={"type": "string"}, headers=RFC8058))})
def unsubscribe_link(body: dict[str, Any]) -> Any:
    """Whoever follows the link withdraws the customer's consent to the topic on the channel,
    so minting one needs its own scope, `links:write` (not `decisions:read`)."""
    from portal.web.links import unsubscribe_headers, unsubscribe_link

    session = get_session()
    with session.begin():
        customer = identity.resolve(session, body["customer"])
        if customer is None:
            return unprocessable("unknown_customer", "no such customer", "customer")
        topic = get_catalog(session).get(body["topic"])
        if topic is None:
            return unprocessable("unknown_topic", "no such topic", "topic")
        if body["channel"] not in topic.channels:
            return unprocessable("channel_not_offered", "not offered on this channel",
                                 "channel")
        return {"url": unsubscribe_link(customer, body["topic"], body["channel"]),
                "headers": unsubscribe_headers(customer, body["topic"], body["channel"])}
