"""Audiences: every customer who may receive a topic on a channel now, with the contact point.

Customers are scanned in keyset order (by id) in chunks and each chunk is judged by
:func:`portal.services.decisions.decide_many`, so memory stays flat however large the base and
the precedence rules are applied exactly as for a single decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from portal.models.consent import ConsentState
from portal.models.customer import Customer
from portal.services.catalog import Catalog, TopicInfo
from portal.services.decisions import Decision, decide_many, requires_granted_choice

CHUNK = 2000


@dataclass(frozen=True)
class Member:
    customer: Customer
    decision: Decision

    def as_json(self) -> dict[str, Any]:
        return {"customer": self.customer.public_id, "contact": self.decision.contact,
                "reason": self.decision.reason, "locale": self.customer.locale}


def candidates(topic: TopicInfo, channel: str, after_id: int, limit: int) -> Select[Any]:
    """Live customers after ``after_id``; only those with a granted choice when nothing else
    can allow a send. The benchmark runs this same query through COPY for comparison."""
    query = select(Customer).where(Customer.id > after_id, Customer.merged_into_id.is_(None),
                                   Customer.erased_at.is_(None))
    if requires_granted_choice(topic, channel):
        # EXISTS, not a join: the planner walks customers in id order and probes the state's
        # primary key, instead of scanning every granted state once per chunk.
        query = query.where(select(ConsentState.customer_id).where(
            ConsentState.customer_id == Customer.id, ConsentState.topic_key == topic.key,
            ConsentState.channel == channel, ConsentState.state == "granted").exists())
    return query.order_by(Customer.id).limit(limit)


def cursor_id(session: Session, cursor: str | None) -> int | None:
    """Cursors are public customer ids (the integer key never leaves the database)."""
    if not cursor:
        return 0
    return session.scalars(select(Customer.id).where(Customer.public_id == cursor)).first()


def scan(session: Session, catalog: Catalog, topic: TopicInfo, channel: str, at: datetime,
         after_id: int = 0, *, chunk: int = CHUNK, default_timezone: str = "UTC"
         ) -> Iterator[tuple[Customer, Member | None]]:
    """Every candidate in id order with its membership (None: may not receive it now)."""
    while True:
        rows = list(session.scalars(candidates(topic, channel, after_id, chunk)))
        if not rows:
            return
        decisions = decide_many(session, catalog, [(c, topic.key, channel) for c in rows], at,
                                default_timezone=default_timezone)
        for customer, decision in zip(rows, decisions, strict=True):
            yield customer, (Member(customer, decision) if decision.allowed else None)
        after_id = rows[-1].id
        session.expunge_all()  # keep memory flat over millions of rows
        if len(rows) < chunk:
            return


def page(session: Session, catalog: Catalog, topic: TopicInfo, channel: str, at: datetime,
         after_id: int, limit: int, *, max_scan: int = 50_000, default_timezone: str = "UTC"
         ) -> tuple[list[Member], str | None]:
    """One page of members and the cursor of the next page (None at the end). A page scans at
    most ``max_scan`` candidates, so a sparse audience answers promptly with fewer items."""
    members: list[Member] = []
    scanned = 0
    last: Customer | None = None
    for customer, member in scan(session, catalog, topic, channel, at, after_id,
                                 chunk=min(CHUNK, max(limit * 2, 100)),
                                 default_timezone=default_timezone):
        last, scanned = customer, scanned + 1
        if member is not None:
            members.append(member)
        if len(members) >= limit or scanned >= max_scan:
            return members, last.public_id
    return members, None
