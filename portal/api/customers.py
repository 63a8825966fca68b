"""Customers and identity: lookup, create, upsert by external id, merge, preferences,
recording consent."""

from __future__ import annotations

from typing import Any

from portal.api import api
from portal.api.common import (
    CUSTOMER_SCHEMA,
    DATE_TIME,
    DECISION_SCHEMA,
    customer_json,
    decision_json,
    obj,
)
from portal.api.core import conflict, not_found, unprocessable
from portal.api.schema import Obj, Str
from portal.api.schemas import ConsentRequest, CustomerCreate, ExternalIdRef, MergeRequest
from portal.core.db import begin_write, get_session, utcnow
from portal.services import identity
from portal.services.accounts import AccountError
from portal.services.catalog import get_catalog
from portal.services.consent import ConsentError, Proof, record_consent
from portal.services.decisions import consent_matrix

READ = ("customers:write", "decisions:read")
LookupQuery = Obj({
    "email": Str(min_length=1, max_length=320), "phone": Str(min_length=1, max_length=32),
    "member_number": Str(min_length=1, max_length=64),
    "namespace": Str(min_length=1, max_length=64), "value": Str(min_length=1, max_length=255),
}, one_of=(("email",), ("phone",), ("member_number",), ("namespace", "value")),
    one_of_at="query", name="LookupQuery",
    description="One identifier: email, phone, member_number, or namespace with value.")
TAKEN = {409: "The email, phone or an external id belongs to another customer.",
         422: "Also invalid_email, invalid_phone (not a valid address or number)."}


def _problem_from(exc: identity.IdentityError | AccountError) -> Any:
    if exc.code.endswith("_taken") or exc.code == "email_lookalike":
        return conflict(exc.code.replace("_", "-"), str(exc), exc.field)
    return unprocessable(exc.code, str(exc), exc.field)


@api.op("GET", "/customers/lookup", summary="Find a customer by one identifier",
        tag="Customers", scopes=READ, query=LookupQuery,
        responses={200: ("The customer (the survivor if merged).", CUSTOMER_SCHEMA)},
        problems={404: "No customer with this identifier."})
def lookup(query: dict[str, Any]) -> Any:
    """Give one of email, phone, member_number, or namespace with value."""
    ref: dict[str, Any] = {"external_id": dict(query)} if "namespace" in query else dict(query)
    session = get_session()
    with session.begin():
        customer = identity.resolve(session, ref)
        if customer is None:
            return not_found("no customer with this identifier", "customer")
        return customer_json(session, customer)


@api.op("POST", "/customers", summary="Create a customer", tag="Customers",
        scopes=("customers:write",), body=CustomerCreate,
        responses={201: ("Created.", CUSTOMER_SCHEMA)}, problems=TAKEN)
def create(body: dict[str, Any]) -> Any:
    """409 when the email, phone or an external id already belongs to someone."""
    session = get_session()
    try:
        with begin_write(session):
            customer = identity.create(session, body)
            return customer_json(session, customer), 201
    except (identity.IdentityError, AccountError) as exc:
        return _problem_from(exc)


@api.op("PUT", "/customers/external/<namespace>/<value>", summary="Create or update the "
        "customer another system knows by this id", tag="Customers",
        scopes=("customers:write",), body=CustomerCreate,
        path={"namespace": ExternalIdRef.fields["namespace"],
              "value": ExternalIdRef.fields["value"]},
        responses={200: ("Updated.", CUSTOMER_SCHEMA), 201: ("Created.", CUSTOMER_SCHEMA)},
        problems=TAKEN)
def upsert_external(namespace: str, value: str, body: dict[str, Any]) -> Any:
    if len(namespace) > 64 or len(value) > 255:
        return unprocessable("too_long", "namespace or value too long", "namespace")
    session = get_session()
    try:
        with begin_write(session):
            customer, created = identity.upsert_external(session, namespace, value, body)
            return customer_json(session, customer), 201 if created else 200
    except (identity.IdentityError, AccountError) as exc:
        return _problem_from(exc)


@api.op("GET", "/customers/<customer_id>", summary="A customer by Carnet id",
        tag="Customers", scopes=READ, responses={200: ("The customer.", CUSTOMER_SCHEMA)})
def get(customer_id: str) -> Any:
    session = get_session()
    with session.begin():
        customer = identity.by_public_id(session, customer_id)
        if customer is None:
            return not_found("no such customer", "customer")
        return customer_json(session, customer)


@api.op("POST", "/customers/merge", summary="Merge two records of the same person",
        tag="Customers", scopes=("customers:write",), body=MergeRequest,
        responses={200: ("The surviving customer.", CUSTOMER_SCHEMA)})
def merge(body: dict[str, Any]) -> Any:
    """Most restrictive choice per topic and channel wins (withdrawn, then pending, then
    granted); suppressions carry over; both histories are kept."""
    session = get_session()
    try:
        with begin_write(session):
            survivor, merged = identity.resolve_many(session, [body["survivor"],
                                                               body["merged"]])
            if survivor is None:
                return unprocessable("unknown_customer", "no such customer", "survivor")
            if merged is None:
                return unprocessable("unknown_customer", "no such customer", "merged")
            identity.merge(session, get_catalog(session), survivor, merged,
                           actor=f"api:{_key_name()}")
            return customer_json(session, survivor)
    except identity.IdentityError as exc:
        return unprocessable(exc.code, str(exc), exc.field)


def _key_name() -> str:
    from flask import g

    return str(g.api_key.name)


@api.op("GET", "/customers/<customer_id>/preferences", summary="Effective consent per topic "
        "and channel", tag="Consent", scopes=("consent:write", "decisions:read"),
        responses={200: ("The matrix.", obj(customer={"type": "string"}, preferences={
            "type": "array", "items": {**DECISION_SCHEMA, "required": [
                "topic", "channel", *DECISION_SCHEMA["required"]], "properties": {
                    "topic": {"type": "string"}, "channel": {"type": "string"},
                    **DECISION_SCHEMA["properties"]}}}))})
def preferences(customer_id: str) -> Any:
    session = get_session()
    with session.begin():
        customer = identity.by_public_id(session, customer_id)
        if customer is None:
            return not_found("no such customer", "customer")
        matrix = consent_matrix(session, get_catalog(session), customer, utcnow())
        return {"customer": customer.public_id, "preferences": [
            {"topic": t, "channel": ch, **decision_json(d)}
            for (t, ch), d in matrix.items()]}


@api.op("POST", "/customers/<customer_id>/consents", summary="Record a choice (call center, "
        "store, paper form...)", tag="Consent", scopes=("consent:write",), body=ConsentRequest,
        responses={201: ("The consent event.", obj(
            event_id={"type": "integer"}, customer={"type": "string"},
            topic={"type": "string"}, channel={"type": "string"},
            state={"enum": ["granted", "withdrawn"]},
            wording_version={"type": ["integer", "null"]}, occurred_at=DATE_TIME))})
def consents(customer_id: str, body: dict[str, Any]) -> Any:
    """``topic`` or ``channel`` may be ``*`` (every topic: a channel switch; both: pause all
    marketing)."""
    session = get_session()
    proof = Proof(source=body["source"], actor=body["actor"], ip=body.get("ip"),
                  user_agent=body.get("user_agent"))
    try:
        with begin_write(session):
            customer = identity.by_public_id(session, customer_id)
            if customer is None:
                return not_found("no such customer", "customer")
            event = record_consent(session, customer, body["topic"], body["channel"],
                                   body["state"], proof, catalog=get_catalog(session),
                                   wording_version=body.get("wording_version"))
            return {"event_id": event.id, "customer": customer.public_id,
                    "topic": event.topic_key, "channel": event.channel, "state": event.state,
                    "wording_version": event.wording_version,
                    "occurred_at": event.occurred_at.isoformat()}, 201
    except ConsentError as exc:
        return unprocessable(exc.code, str(exc), exc.field)
