"""Audiences: every customer who may receive a topic on a channel now, with the contact point.

Candidates are read in id order by one query through a server-side cursor (PostgreSQL; SQLite
steps its cursor row by row anyway), as plain rows of the columns decisions read, and each chunk
is judged by :func:`portal.services.decisions.decide_many`. Memory stays flat however large the
base, and the precedence rules are applied exactly as for a single decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, and_, select
from sqlalchemy.orm import Session, aliased

from portal.fast_rows import stream_rows
from portal.models.consent import ANY, ConsentState, ContactRule, Suppression
from portal.models.customer import Customer
from portal.services.catalog import Catalog, TopicInfo
from portal.services.decisions import (
    PERSON_COLUMNS,
    Decider,
    Decision,
    Evidence,
    Person,
    PersonRow,
    Pressure,
    assemble_facts,
    contact_for,
    recent_sends,
    requires_granted_choice,
    resolve_contacts,
    shape_of,
)

CHUNK = 5000


@dataclass(frozen=True)
class Member:
    customer: Person
    decision: Decision

    def as_json(self) -> dict[str, Any]:
        return {"customer": self.customer.public_id, "contact": self.decision.contact,
                "reason": self.decision.reason, "locale": self.customer.locale}


def candidates(topic: TopicInfo, channel: str, after_id: int, limit: int | None) -> Select[Any]:
    """Live customers after ``after_id``; only those with a granted choice when nothing else
    can allow a send. The benchmark runs this same query through COPY for comparison."""
    columns: tuple[Any, ...] = PERSON_COLUMNS
    query: Select[Any] = select(*columns).where(
        Customer.id > after_id, Customer.merged_into_id.is_(None), Customer.erased_at.is_(None))
    if requires_granted_choice(topic, channel):
        # EXISTS, not a join: a candidate appears once whatever else is joined to it.
        query = query.where(select(ConsentState.customer_id).where(
            ConsentState.customer_id == Customer.id, ConsentState.topic_key == topic.key,
            ConsentState.channel == channel, ConsentState.state == "granted").exists())
    query = query.order_by(Customer.id)
    return query if limit is None else query.limit(limit)


def cursor_id(session: Session, cursor: str | None) -> int | None:
    """Cursors are public customer ids (the integer key never leaves the database)."""
    if not cursor:
        return 0
    return session.scalars(select(Customer.id).where(Customer.public_id == cursor)).first()


def _with_facts(query: Select[Any], topic: TopicInfo, channel: str) -> Select[Any]:
    """The candidates with everything :func:`decide` reads about them for (topic, channel),
    joined in the same query: the state of the choice, of the channel switch and of the
    marketing pause, an active suppression and the contact rule. Each join meets at most one
    row (primary keys; the suppression is a scalar subquery), so there is still one row per
    candidate, and the export reads the facts as it streams instead of querying again for
    every chunk. An export answers who may receive, not why: the events behind the states
    (the evidence of a single decision) are not joined."""
    states = []
    for name, topic_key, channel_key in (("choice", topic.key, channel), ("off", ANY, channel),
                                         ("paused", ANY, ANY)):
        state = aliased(ConsentState, name=f"{name}_state")
        query = query.outerjoin(state, and_(
            state.customer_id == Customer.id, state.topic_key == topic_key,
            state.channel == channel_key))
        states.append(state.state.label(f"{name}_state"))
    suppression = select(Suppression.reason).where(
        Suppression.customer_id == Customer.id, Suppression.channel == channel,
        Suppression.lifted_at.is_(None)).order_by(Suppression.id).limit(1).scalar_subquery()
    return query.outerjoin(ContactRule, and_(
        ContactRule.customer_id == Customer.id, ContactRule.channel == channel)).add_columns(
        *states, suppression.label("suppressed"), ContactRule.max_per_week,
        ContactRule.quiet_start, ContactRule.quiet_end)


# A state without its event: decide() reads only the state of a choice, switch or pause.
_STATES = {state: Evidence(0, datetime.min.replace(tzinfo=UTC), "", None, state)
           for state in ("granted", "pending", "withdrawn")}


def scan(session: Session, catalog: Catalog, topic: TopicInfo, channel: str, at: datetime,
         after_id: int = 0, *, chunk: int | None = None, limit: int | None = None,
         default_timezone: str = "UTC") -> Iterator[tuple[Person, Member | None]]:
    """Every candidate in id order with its membership (None: may not receive it now).

    Each candidate is judged by :class:`~portal.services.decisions.Decider`: :func:`decide`
    runs for the first person of each shape of facts, and the others of that shape (nearly
    everyone, in a large base) take its verdict without building their facts."""
    chunk = chunk or CHUNK
    width = len(PERSON_COLUMNS)
    decider = Decider(at)
    session.flush()  # plain-row reads below do not autoflush pending ORM changes
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        # The planner's estimate for a whole base passes the JIT thresholds, and compiling
        # the joins cost seconds of CPU (more than running them) before the first row.
        conn.exec_driver_sql("SET LOCAL jit = off")
    query = _with_facts(candidates(topic, channel, after_id, limit), topic, channel)
    for plain in stream_rows(session, query, None, chunk):
        rows = [PersonRow._make(row[:width]) for row in plain]
        sends = recent_sends(session, [row[0] for row in plain if row[-3]], (channel,), at)
        resolved = resolve_contacts(session, channel, rows)
        for row, facts_row in zip(rows, plain, strict=True):
            choice, off, paused, suppressed, max_per_week, quiet_start, quiet_end = \
                facts_row[width:]
            contact = (resolved.get(row[0]) if resolved is not None
                       else contact_for(row, channel))
            if max_per_week is None and quiet_start is None and quiet_end is None:
                known = decider.known(topic, channel, shape_of(
                    erased=row.erased_at is not None, suppressed=bool(suppressed),
                    paused=paused == "withdrawn", channel_off=off == "withdrawn",
                    choice=choice, reachable=contact is not None))
                if known is not None:
                    yield row, (Member(row, Decision(
                        known.decision, known.reason, None, None,
                        contact if known.contact is not None else None, known.trace))
                        if known.allowed else None)
                    continue
            rule = (None if max_per_week is None and quiet_start is None
                    and quiet_end is None else Pressure(max_per_week, quiet_start, quiet_end))
            facts = assemble_facts(
                row, channel, choice=_STATES.get(choice), off=_STATES.get(off),
                paused=_STATES.get(paused), suppressed=suppressed, rule=rule,
                sends=sends.get((row[0], channel), ()), resolved=resolved,
                default_timezone=default_timezone)
            decision = decider.decide(topic, channel, facts)
            yield row, (Member(row, decision) if decision.allowed else None)


def page(session: Session, catalog: Catalog, topic: TopicInfo, channel: str, at: datetime,
         after_id: int, limit: int, *, max_scan: int = 50_000, default_timezone: str = "UTC"
         ) -> tuple[list[Member], str | None]:
    """One page of members and the cursor of the next page (None at the end). A page scans at
    most ``max_scan`` candidates, so a sparse audience answers promptly with fewer items."""
    members: list[Member] = []
    scanned = 0
    last: Person | None = None
    for customer, member in scan(session, catalog, topic, channel, at, after_id,
                                 chunk=min(CHUNK, max(limit * 2, 100)), limit=max_scan,
                                 default_timezone=default_timezone):
        last, scanned = customer, scanned + 1
        if member is not None:
            members.append(member)
        if len(members) >= limit or scanned >= max_scan:
            return members, last.public_id
    return members, None
