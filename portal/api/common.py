"""Small helpers the API views share: the catalog, time, customer resolution and answers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from sqlalchemy.orm import Session

from portal.core.db import get_session, utcnow
from portal.models.customer import Customer
from portal.services import identity
from portal.services.catalog import Catalog, get_catalog
from portal.services.decisions import Decision

PROBLEM = {"$ref": "#/components/schemas/Problem"}


CATALOG_TTL = 5.0


def catalog() -> Catalog:
    """The catalog, cached per app for a few seconds: it changes when ``catalog load`` runs,
    and re-reading it on every decision doubled the queries of a single decision. Read
    through the request's Session when the cached copy has expired (in its own short
    transaction if the Session is not in one)."""
    cached = current_app.extensions.get("carnet.api.catalog")
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]  # type: ignore[no-any-return]
    session = get_session()
    if session.in_transaction():
        fresh = get_catalog(session)
    else:
        with session.begin():
            fresh = get_catalog(session)
    current_app.extensions["carnet.api.catalog"] = (now + CATALOG_TTL, fresh)
    return fresh


def at_or_now(value: datetime | None) -> datetime:
    return value if value is not None else utcnow()


def default_timezone() -> str:
    return str(current_app.config["DEFAULT_TIMEZONE"])


def decision_json(d: Decision, explain: bool = False) -> dict[str, Any]:
    verdict, reason, evidence, next_at, contact, trace = d
    out: dict[str, Any] = {
        "decision": verdict, "allowed": verdict == "send", "reason": reason,
        "next_allowed_at": next_at.astimezone(UTC).isoformat() if next_at else None,
        "contact": contact,
        "evidence": evidence.as_dict() if evidence else None,
    }
    if explain:
        out["trace"] = [{"rule": rule, "outcome": outcome} for rule, outcome in trace]
    return out


def customer_json(session: Session, customer: Customer) -> dict[str, Any]:
    return identity.as_json(session, [customer])[0]


def obj(*, optional: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    """A response object: every property is always present unless named in ``optional``."""
    out: dict[str, Any] = {"type": "object", "properties": props}
    required = [name for name in props if name not in optional]
    if required:
        out["required"] = required
    return out


DATE_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}


DECISION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["decision", "allowed", "reason", "next_allowed_at", "contact", "evidence"],
    "properties": {
        "decision": {"enum": ["send", "deny", "defer"]},
        "allowed": {"type": "boolean"},
        "reason": {"type": "string", "description": "See docs/decisions.md for every code."},
        "next_allowed_at": {"type": ["string", "null"], "format": "date-time"},
        "contact": {"type": ["object", "null"]},
        "evidence": {"type": ["object", "null"], "properties": {
            "event_id": {"type": "integer"}, "occurred_at": {"type": "string"},
            "source": {"type": "string"}, "wording_version": {"type": ["integer", "null"]}}},
        "trace": {"type": "array", "items": {
            "type": "object", "required": ["rule", "outcome"],
            "properties": {"rule": {"type": "string"}, "outcome": {"type": "string"}}},
            "description": "Only with explain."},
    },
}

CUSTOMER_SCHEMA: dict[str, Any] = obj(
    id={"type": "string"}, email={"type": ["string", "null"]},
    phone={"type": ["string", "null"]}, postal_address={"type": ["string", "null"]},
    locale={"type": ["string", "null"]}, timezone={"type": ["string", "null"]},
    external_ids={"type": "array", "items": obj(namespace={"type": "string"},
                                                value={"type": "string"})},
    member_number={"type": ["string", "null"]}, created_at=DATE_TIME,
    erased={"type": "boolean"},
)
