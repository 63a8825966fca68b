"""The consent precedence: the one place that turns events, suppressions, contact rules and
the catalog into "may we send topic T to this person on channel C now?".

The portal's matrix, the decision API, audience exports and every fan-out (web push, wallet
messages) call :func:`decide`. The order of :data:`RULES` is the product's promise to the
people it protects, most restrictive first; ``docs/decisions.md`` explains each rule and the
table-driven test in ``tests/unit/test_decisions.py`` pins it down.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import cache
from typing import Any, Literal, NamedTuple, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from sqlalchemy import (
    JSON,
    ColumnElement,
    Select,
    String,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    null,
    select,
    true,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from portal.core.fast_rows import Reader, dialect_of, fetch_rows, fetch_rows_split, flushed
from portal.models.consent import (
    ANY,
    Dispatch,
)
from portal.models.customer import Customer
from portal.services.catalog import Catalog, TopicInfo

Verdict = Literal["send", "deny", "defer"]

# Evaluated in this order; the first rule that speaks decides.
RULES: tuple[str, ...] = (
    "customer",          # unknown_customer
    "topic",             # unknown_topic
    "channel_offered",   # channel_not_offered
    "erased",            # erased
    "suppression",       # suppressed
    "required_service",  # required_service (allowed)
    "marketing_pause",   # marketing_paused
    "channel_switch",    # channel_off
    "choice",            # consented / withdrawn / pending_confirmation
    "default",           # consented / not_consented
    "contact_point",     # no_contact_point
    "quiet_hours",       # quiet_hours (defer)
    "frequency_cap",     # frequency_cap (defer)
)

REASONS: tuple[str, ...] = (
    "consented", "required_service", "not_consented", "withdrawn", "pending_confirmation",
    "channel_off", "marketing_paused", "suppressed", "no_contact_point", "channel_not_offered",
    "unknown_topic", "unknown_customer", "erased", "quiet_hours", "frequency_cap",
)

WEEK = timedelta(days=7)
CONTACT_FIELDS = {"email": "email", "sms": "phone", "voice": "phone", "postal": "postal_address"}


# The value types below are named tuples, immutable like frozen dataclasses and built several
# times faster: a 10,000-item batch builds tens of thousands of them.


class Evidence(NamedTuple):
    event_id: int
    occurred_at: datetime
    source: str
    wording_version: int | None
    state: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at.isoformat(),
            "source": self.source,
            "wording_version": self.wording_version,
        }


class Pressure(NamedTuple):
    """Contact pressure for one channel, with the dispatches inside the last week."""

    max_per_week: int | None = None
    quiet_start: time | None = None
    quiet_end: time | None = None
    timezone: str = "UTC"
    recent_sends: tuple[datetime, ...] = ()


_NO_PRESSURE = Pressure()


class Facts(NamedTuple):
    """Everything known of one person for one (topic, channel) question."""

    erased: bool = False
    suppressed: str | None = None           # the suppression reason
    paused: Evidence | None = None          # (*, *) withdrawn
    channel_off: Evidence | None = None     # (*, channel) withdrawn
    choice: Evidence | None = None          # (topic, channel) latest event
    contact: dict[str, Any] | None = None   # None: no way to reach them on this channel
    pressure: Pressure = _NO_PRESSURE


class Decision(NamedTuple):
    decision: Verdict
    reason: str
    evidence: Evidence | None = None
    next_allowed_at: datetime | None = None
    contact: dict[str, Any] | None = None
    trace: tuple[tuple[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.decision == "send"


def decide(
    topic: TopicInfo | None,
    channel: str,
    facts: Facts | None,
    at: datetime,
    *,
    delivery: bool = True,
) -> Decision:
    """Apply :data:`RULES` in order. ``facts`` is None for an unknown customer.

    With ``delivery=False`` only consent is judged (the portal's matrix): contact points and
    contact pressure are about a particular send, not about what the person agreed to.

    Audience exports call this once per candidate, so it is written flat: one list of
    (rule, outcome) pairs, no intermediate objects.
    """
    trace: list[tuple[str, str]] = []
    add = trace.append

    def verdict(rule: str, decision: Verdict, reason: str, evidence: Evidence | None = None
                ) -> Decision:
        add((rule, reason))
        return Decision(decision, reason, evidence, trace=tuple(trace))

    if facts is None:
        return verdict("customer", "deny", "unknown_customer")
    add(("customer", "pass"))
    if topic is None:
        return verdict("topic", "deny", "unknown_topic")
    add(("topic", "pass"))
    if channel not in topic.channels:
        return verdict("channel_offered", "deny", "channel_not_offered")
    add(("channel_offered", "pass"))
    if facts.erased:
        return verdict("erased", "deny", "erased")
    add(("erased", "pass"))
    if facts.suppressed:
        return verdict("suppression", "deny", "suppressed")
    add(("suppression", "pass"))

    evidence: Evidence | None = None
    if topic.required:
        add(("required_service", "required_service"))
        reason = "required_service"
    else:
        add(("required_service", "pass"))
        if topic.marketing and facts.paused is not None:
            return verdict("marketing_pause", "deny", "marketing_paused", facts.paused)
        add(("marketing_pause", "pass"))
        if facts.channel_off is not None:
            return verdict("channel_switch", "deny", "channel_off", facts.channel_off)
        add(("channel_switch", "pass"))
        choice = facts.choice
        if choice is not None:
            if choice.state == "granted":
                add(("choice", "consented"))
                reason, evidence = "consented", choice
            elif choice.state == "pending":
                return verdict("choice", "deny", "pending_confirmation", choice)
            else:
                return verdict("choice", "deny", "withdrawn", choice)
        else:
            add(("choice", "pass"))
            if topic.defaults.get(channel, False):
                add(("default", "consented"))
                reason = "consented"
            else:
                return verdict("default", "deny", "not_consented")

    if not delivery:
        return Decision("send", reason, evidence, trace=tuple(trace))
    if facts.contact is None:
        return verdict("contact_point", "deny", "no_contact_point", evidence)
    add(("contact_point", "pass"))
    if topic.marketing:
        blocked, next_at = _pressure(facts.pressure, at)
        if blocked is not None:
            for rule in ("quiet_hours", "frequency_cap"):
                add((rule, blocked if rule == blocked else "pass"))
                if rule == blocked:
                    break
            return Decision("defer", blocked, evidence, next_at, facts.contact, tuple(trace))
    add(("quiet_hours", "pass"))
    add(("frequency_cap", "pass"))
    return Decision("send", reason, evidence, None, facts.contact, tuple(trace))


Shape = tuple[Any, ...]


def shape_of(*, erased: bool, suppressed: bool, paused: bool, channel_off: bool,
             choice: str | None, reachable: bool) -> Shape:
    """Everything :func:`decide` reads of a person's facts except time, evidence and contact
    values: whether they are erased or suppressed, whether marketing is paused or the channel
    switched off (withdrawn), the state of their choice, and whether they have a contact
    point. Two people of the same shape get the same verdict, reason and trace for the same
    (topic, channel) and the same contact pressure (cap, quiet hours, time zone and the
    week's dispatches, from which the time decides)."""
    return (erased, suppressed, paused, channel_off, choice, reachable)


def facts_shape(facts: Facts) -> Shape:
    """The :func:`shape_of` these facts."""
    # shape_of's tuple, built in place: this runs once per decision of a batch
    return (facts.erased, bool(facts.suppressed), facts.paused is not None,
            facts.channel_off is not None, None if facts.choice is None else facts.choice.state,
            facts.contact is not None)


CHOICE_STATES: tuple[str | None, ...] = (None, "granted", "pending", "withdrawn")


def live_shapes() -> list[Shape]:
    """Every shape a person who is not erased can have."""
    return [shape_of(erased=False, suppressed=suppressed, paused=paused, channel_off=off,
                     choice=choice, reachable=reachable)
            for suppressed in (False, True) for paused in (False, True)
            for off in (False, True) for choice in CHOICE_STATES
            for reachable in (False, True)]


# A state without its event, for readers that know only the state (the audience export):
# decide() reads only whether evidence exists and its state.
STATE_ONLY = {state: Evidence(0, datetime.min.replace(tzinfo=ZoneInfo("UTC")), "", None, state)
              for state in ("granted", "pending", "withdrawn")}


def facts_of_shape(shape: Shape, contact: dict[str, Any], pressure: Pressure | None = None
                   ) -> Facts:
    """Facts of one person of this shape (:data:`STATE_ONLY` evidence), reached at
    ``contact`` if the shape is reachable."""
    erased, suppressed, paused, channel_off, choice, reachable = shape
    return Facts(erased=erased, suppressed="suppressed" if suppressed else None,
                 paused=STATE_ONLY["withdrawn"] if paused else None,
                 channel_off=STATE_ONLY["withdrawn"] if channel_off else None,
                 choice=STATE_ONLY[choice] if choice else None,
                 contact=contact if reachable else None,
                 pressure=pressure or _NO_PRESSURE)


class Decider:
    """:func:`decide` for many people at one instant, run once per shape of facts
    (:func:`facts_shape`), contact pressure and topic × channel, then reused: a batch or an
    export meets a few dozen of them in 10,000 or 1,000,000 people. Every verdict still comes
    from :func:`decide`; only its evidence and contact are those of each person. Built per
    call, so a catalog or rule change never meets a stale verdict."""

    _SLOTS = ("choice", "channel_off", "paused")

    def __init__(self, at: datetime, *, delivery: bool = True) -> None:
        self.at, self.delivery = at, delivery
        self._seen: dict[tuple[int, str, Shape, Pressure],
                         tuple[Decision, str | None, bool]] = {}

    def verdicts(self, topic: TopicInfo, channel: str, shapes: Iterable[Shape]
                 ) -> dict[Shape, Decision]:
        """The verdict of :func:`decide` for one person of each shape, without contact
        pressure: what a bulk reader that can tell each row's shape (the audience export's
        SQL) applies to every row of that shape. Evidence and contact are stand-ins."""
        return {shape: self.decide(topic, channel, facts_of_shape(shape, {"stand_in": True}))
                for shape in shapes}

    def known(self, topic: TopicInfo, channel: str, shape: Shape,
              pressure: Pressure | None = None) -> Decision | None:
        """The verdict already reached for this shape and pressure (none by default), its
        evidence and contact left out, or None: the caller then builds the facts and calls
        :meth:`decide`."""
        hit = self._seen.get((id(topic), channel, shape, pressure or _NO_PRESSURE))
        return None if hit is None else hit[0]

    def decide(self, topic: TopicInfo | None, channel: str, facts: Facts | None) -> Decision:
        if facts is None or topic is None:
            return decide(topic, channel, facts, self.at, delivery=self.delivery)
        key = (id(topic), channel, facts_shape(facts), facts.pressure)
        hit = self._seen.get(key)
        if hit is None:
            decision = decide(topic, channel, facts, self.at, delivery=self.delivery)
            slot = next((name for name in self._SLOTS if decision.evidence is not None
                         and decision.evidence is getattr(facts, name)), None)
            self._seen[key] = (decision, slot, decision.contact is not None)
            return decision
        template, slot, with_contact = hit
        return Decision(template.decision, template.reason,
                        getattr(facts, slot) if slot else None, template.next_allowed_at,
                        facts.contact if with_contact else None, template.trace)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _quiet_until(p: Pressure, at: datetime) -> datetime | None:
    """If ``at`` falls in the quiet window (local time, may wrap midnight), when it ends."""
    if p.quiet_start is None or p.quiet_end is None or p.quiet_start == p.quiet_end:
        return None
    local = at.astimezone(_zone(p.timezone))
    now = local.time().replace(tzinfo=None)
    start, end = p.quiet_start, p.quiet_end
    inside = start <= now < end if start < end else (now >= start or now < end)
    if not inside:
        return None
    end_day = local.date()
    if start > end and now >= start:
        end_day = end_day + timedelta(days=1)
    naive_end = datetime.combine(end_day, end)
    return naive_end.replace(tzinfo=local.tzinfo).astimezone(at.tzinfo)


def _cap_until(p: Pressure, at: datetime) -> datetime | None:
    if p.max_per_week is None:
        return None
    limit = max(1, p.max_per_week)  # input allows 1..100; "none at all" is the channel switch
    window = sorted(t for t in p.recent_sends if at - WEEK < t <= at)
    if len(window) < limit:
        return None
    # The cap frees up when enough of the oldest sends leave the 7-day window.
    return window[len(window) - limit] + WEEK


def _pressure(p: Pressure, at: datetime) -> tuple[str | None, datetime | None]:
    if p.max_per_week is None and (p.quiet_start is None or p.quiet_end is None):
        return None, None  # no cap, no quiet window: nothing to wait for
    first: str | None = None
    when = at
    for _ in range(8):
        quiet = _quiet_until(p, when)
        cap = _cap_until(p, when)
        if quiet is None and cap is None:
            break
        if first is None:
            first = "quiet_hours" if quiet is not None else "frequency_cap"
        when = max(t for t in (quiet, cap) if t is not None)
    return first, (when if first else None)


# --- loading facts from the database, in bulk ------------------------------------------------
#
# Everything below reads plain tuples through Core selects: building ORM objects for tens of
# thousands of rows cost more than the queries themselves, and the rules only need a few
# columns. A ``Person`` is anything with the customer columns decisions read: a Customer, or a
# row of :data:`PERSON_COLUMNS` (what :func:`portal.services.identity.resolve_people` returns).


class Person(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def public_id(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def phone(self) -> str | None: ...
    @property
    def postal_address(self) -> str | None: ...
    @property
    def locale(self) -> str | None: ...
    @property
    def timezone(self) -> str | None: ...
    @property
    def erased_at(self) -> datetime | None: ...


PERSON_COLUMNS = (Customer.id, Customer.public_id, Customer.email, Customer.phone,
                  Customer.postal_address, Customer.locale, Customer.timezone,
                  Customer.erased_at, Customer.merged_into_id)


class PersonRow(NamedTuple):
    """A row of :data:`PERSON_COLUMNS`: a :class:`Person` without an ORM object."""

    id: int
    public_id: str
    email: str | None
    phone: str | None
    postal_address: str | None
    locale: str | None
    timezone: str | None
    erased_at: datetime | None
    merged_into_id: int | None


def among(session: Reader, column: Any, values: Collection[Any]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``, one parameter however many
    values, so the statement text (and its prepared plan) is the same for 1 or 10,000."""
    if len(values) == 1:
        return column == next(iter(values))  # type: ignore[no-any-return]
    return in_values(dialect_of(session), column, None, list(values))


def in_values(dialect: str, column: Any, name: str | None, value: Any = None, *,
              one: bool = False) -> ColumnElement[bool]:
    """With ``one``, plain ``column = :name`` for a single value: PostgreSQL then settles on
    one generic plan for the prepared statement, where ``= ANY(:array)`` made it plan every
    execution again (a custom plan looks cheaper for one element than the generic plan's
    guess), about 100 µs of a single decision.

    ``column`` among a list given as ONE parameter: ``= ANY(:array)`` on PostgreSQL,
    ``IN (SELECT value FROM json_each(:json))`` on SQLite. The statement text never depends on
    the number of values, so it is compiled (and on PostgreSQL prepared) once, instead of
    being re-rendered with one placeholder per value on every call."""
    if one:
        return column == bindparam(name, value)  # type: ignore[no-any-return]
    if dialect == "postgresql":
        return column == any_(bindparam(name, value, type_=ARRAY(column.type)))  # type: ignore[no-any-return]
    if dialect == "sqlite":
        values = func.json_each(bindparam(name, value, type_=JSON)).table_valued("value")
        return column.in_(select(values.c.value))  # type: ignore[no-any-return]
    return column.in_(bindparam(name, value, expanding=True))  # type: ignore[no-any-return]


def restrict_to(dialect: str, query: Select[*tuple[Any, ...]], column: Any, name: str, *,
                one: bool = False) -> Select[Any]:
    """``query`` restricted to rows whose ``column`` is among the values of parameter ``name``.

    On PostgreSQL with many values, one index probe per value through a fenced LATERAL join,
    ``json_array_elements_text(:name) CROSS JOIN LATERAL (query WHERE column = value
    OFFSET 0)`` (the values as one JSON text: :class:`JSONList`). Given
    ``= ANY(:array)`` with thousands of elements the planner preferred a parallel sequential
    scan of every customer, or a hash of every consent state: reasonable for one query alone,
    but parts of a batch read side by side then scanned everything once each. ``OFFSET 0``
    keeps the planner from flattening the subquery."""
    if one or dialect != "postgresql":
        return query.where(in_values(dialect, column, name, one=one))
    values = func.json_array_elements_text(cast(bindparam(name, type_=JSONList()), JSON)
                                           ).table_valued("value").render_derived(
                                               name=f"{name}_each")
    value = (values.c.value if isinstance(column.type, String)
             else cast(values.c.value, column.type))
    inner = query.where(column == value).offset(0).lateral(f"{name}_rows")
    return select(*inner.c).select_from(values).join(inner, true())


class JSONList(TypeDecorator[list[Any]]):
    """A list of values sent as one JSON text (orjson), which PostgreSQL unpacks with
    ``json_array_elements_text``: psycopg builds an array parameter value by value in Python,
    about 1.3 µs a value, five times what orjson takes. The values come back as text, cast to
    the column's type where it is not a string (a string column is compared as text: a cast
    to ``VARCHAR(n)`` would cut longer values short)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: list[Any] | None, dialect: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()


def _none(type_: Any) -> Any:
    return cast(null(), type_)


Copy = tuple[int, str | None]  # (customer id, their customers.decision_facts)


class FactIndex(NamedTuple):
    """What :func:`index_facts` found, by customer."""

    states: dict[tuple[int, str, str], Evidence]  # (customer, topic, channel): state + event
    suppressed: dict[tuple[int, str], str]         # (customer, channel): a reason
    rules: dict[tuple[int, str], Pressure]         # (customer, channel): cap, quiet hours


def index_facts(copies: Iterable[Copy], topics: Collection[str], channels: Collection[str]
                ) -> FactIndex:
    """The facts of the topics and channels given (``*`` included if wanted) from customers'
    copies (``customers.decision_facts``, kept by the database:
    :mod:`portal.models.decision_facts`): each element is ``[kind, topic, channel, event id,
    occurred at, source, wording version, state, max per week, quiet start, quiet end]``,
    kind ``s`` (a consent state and the event that set it), ``x`` (an active suppression,
    its reason in "source") or ``r`` (a contact rule)."""
    states: dict[tuple[int, str, str], Evidence] = {}
    suppressed: dict[tuple[int, str], str] = {}
    rules: dict[tuple[int, str], Pressure] = {}
    loads, moment = orjson.loads, datetime.fromisoformat
    for cid, raw in copies:
        if raw is None:
            continue
        for (kind, topic, channel, event_id, occurred, source, wording, state, cap, start,
             end) in loads(raw):
            if channel not in channels:
                continue
            if kind == "s":
                if topic in topics:
                    states[(cid, topic, channel)] = Evidence(
                        event_id, moment(occurred), source, wording, state)
            elif kind == "x":
                suppressed.setdefault((cid, channel), source)
            else:
                rules[(cid, channel)] = Pressure(
                    cap, None if start is None else time.fromisoformat(start),
                    None if end is None else time.fromisoformat(end))
    return FactIndex(states, suppressed, rules)


@cache
def _fact_queries(dialect: str, one: bool = False) -> dict[str, Any]:
    """The bulk reads of :func:`load_facts`, built once per dialect and run on the Session's
    Connection: building and caching a select on every call cost more than running it.

    Facts are each customer's copy (:func:`index_facts`): one primary-key probe per person,
    where reading states (and their events), suppressions and contact rules took four. The
    topics and channels asked are filtered in Python: a person has a few facts.

    With ``one``, the same queries for a single customer (``ids`` is then one id)."""
    return {
        "facts": restrict_to(dialect, select(Customer.id, Customer.decision_facts).where(
            Customer.decision_facts.is_not(None)), Customer.id, "ids", one=one),
        "sends": select(Dispatch.customer_id, Dispatch.channel, Dispatch.sent_at)
        .where(in_values(dialect, Dispatch.customer_id, "ids", one=one),
               in_values(dialect, Dispatch.channel, "channels"),
               Dispatch.sent_at > bindparam("since", type_=Dispatch.sent_at.type),
               Dispatch.sent_at <= bindparam("until", type_=Dispatch.sent_at.type)),
    }


_PERSON_TAIL = (Customer.public_id, Customer.email, Customer.phone, Customer.postal_address,
                Customer.locale, Customer.timezone, Customer.erased_at)


@dataclass(frozen=True, eq=False)
class Guard:
    """A condition the single-decision statement checks before it looks anyone up, with rows
    it returns about that condition, in the same round trip. The API passes the caller's key:
    the key is read with the decision, and nobody is looked up for a key that does not
    exist. ``rows`` labels its columns after those of the statement it joins
    (:func:`_layout`: ``customer_id``, ``public_id``, ``decision_facts``, ``erased_at``...);
    the others are NULL. Compared by identity: one instance per purpose, built once, so that
    the statement is built once too."""

    holds: ColumnElement[bool]
    rows: Select[Any]


@cache
def _person_with_facts(dialect: str, lookup: str, guard: Guard | None = None) -> Any:
    """One statement for one decision: the customer whose ``lookup`` column (public id,
    email or phone) is ``:value`` (the survivor, if that record was merged) with their facts
    (kind ``p``), and with a ``guard``, its rows (kind ``g``), the customer looked up only if
    it holds. Key, person and facts were three statements, each a round trip and ~100 µs of
    the client's CPU; this makes them one."""
    asked = aliased(Customer, name="asked")
    found = select(func.coalesce(asked.merged_into_id, asked.id)).where(
        getattr(asked, lookup) == bindparam("value"))
    if guard is not None:
        found = found.where(guard.holds)
    the_person: Select[*tuple[Any, ...]] = select(
        literal_column("'p'").label("kind"), Customer.id.label("customer_id"), *_PERSON_TAIL,
        Customer.decision_facts,
    ).where(Customer.id == found.scalar_subquery())
    if guard is None:
        return the_person
    layout = _layout()
    given = {column.name: column for column in guard.rows.selected_columns}
    assert set(given) <= set(layout) - {"kind"}, set(given) - set(layout)
    return union_all(the_person, guard.rows.with_only_columns(
        literal_column("'g'").label("kind"),
        *(given[name].label(name) if name in given else _none(type_).label(name)
          for name, type_ in list(layout.items())[1:])))


@cache
def _people_with_facts(dialect: str, lookup: str) -> dict[str, Any]:
    """The bulk counterpart of :func:`_person_with_facts`, for a batch: for every value of
    ``:values`` in the ``lookup`` column (public id, email or phone), the customer found and
    their facts, the value last (``found``); and the survivors of merged records, by id
    (``survivors``)."""
    column = getattr(Customer, lookup)
    return {
        "found": restrict_to(dialect, select(*PERSON_COLUMNS, Customer.decision_facts,
                                             column.label("looked_up")), column, "values"),
        "survivors": restrict_to(dialect, select(*PERSON_COLUMNS, Customer.decision_facts),
                                 Customer.id, "ids"),
    }


def people_with_facts(session: Reader, lookup: str, values: list[Any]
                      ) -> tuple[dict[Any, PersonRow], list[Copy]]:
    """For a batch: {value: the person decisions are about (the survivor if that record was
    merged)} for the values of the ``lookup`` column found, and the copies of their facts for
    :func:`decide_many` (:func:`index_facts`): one statement, and a second one only if some of
    the records found were merged into others. A long batch calls it once per part, each
    part on a helper's connection (:func:`portal.core.fast_rows.read_ahead`)."""
    flushed(session)
    queries = _people_with_facts(dialect_of(session), lookup)
    rows = fetch_rows(session, queries["found"], {"values": values})
    width = len(PERSON_COLUMNS)
    merged = {row[width - 1] for row in rows if row[width - 1] is not None}
    survivors = {row[0]: row for row in fetch_rows(
        session, queries["survivors"], {"ids": list(merged)})} if merged else {}
    people: dict[Any, PersonRow] = {}
    facts: dict[int, str | None] = {}
    for row in rows:
        target = survivors.get(row[width - 1], row)
        people[row[width + 1]] = PersonRow._make(target[:width])
        facts[target[0]] = target[width]
    return people, list(facts.items())


def guard_row(row: tuple[Any, ...], guard: Guard) -> dict[str, Any]:
    """A row of kind ``g`` of :func:`_person_with_facts`, as {label: value} of the guard's
    columns."""
    return {name: row[index] for name, index in _guard_positions(guard)}


@cache
def _guard_positions(guard: Guard) -> tuple[tuple[str, int], ...]:
    names = list(_layout())
    return tuple((column.name, names.index(column.name))
                 for column in guard.rows.selected_columns)


@cache
def _layout() -> dict[str, Any]:
    """{name: type} of the columns of :func:`_person_with_facts`, in order: kind, the
    customer's id, :data:`_PERSON_TAIL`, their facts."""
    return {"kind": String(), "customer_id": Customer.id.type,
            **{column.key: column.type for column in _PERSON_TAIL},
            "decision_facts": Customer.decision_facts.type}


def decide_one(session: Reader, catalog: Catalog, lookup: str, value: Any, topic_key: str,
               channel: str, at: datetime, *, default_timezone: str = "UTC",
               guard: Guard | None = None, guard_params: dict[str, Any] | None = None
               ) -> tuple[Person | None, Decision, list[dict[str, Any]]]:
    """The single decision: the person found by ``lookup`` = ``value`` and the answer for
    (topic, channel), from one statement (:func:`_person_with_facts`), with the rows of the
    ``guard`` if one is given (nobody is found if it does not hold). Answers exactly what
    :func:`decide_many` answers for the same question."""
    flushed(session)
    rows = fetch_rows(session, _person_with_facts(dialect_of(session), lookup, guard),
                      {"value": value, **(guard_params or {})})
    guarded = [] if guard is None else [guard_row(row, guard) for row in rows
                                          if row[0] == "g"]
    topic = catalog.get(topic_key)
    found = [row for row in rows if row[0] == "p"]
    if not found:
        return None, decide(topic, channel, None, at), guarded
    row = found[0]
    width = len(_PERSON_TAIL)
    person = PersonRow._make((row[1], *row[2:2 + width], None))
    key = (person.id, topic_key, channel)
    facts = _facts_from_copies(session, {person.id: person}, {(topic_key, channel)}, [key],
                               [(person.id, row[2 + width])], at,
                               default_timezone=default_timezone)
    return person, decide(topic, channel, facts[key], at), guarded


def contact_for(customer: Person, channel: str) -> dict[str, Any] | None:
    """The contact point a sender would use, or None if there is none."""
    field_name = CONTACT_FIELDS.get(channel)
    if field_name is not None:
        value = getattr(customer, field_name)
        return {field_name: value} if value else None
    if channel == "app_push":
        # The app's own push platform holds device tokens, keyed by our customer id.
        return {"customer_id": customer.public_id}
    return None


# Channels whose contact points live outside the customer row register a resolver here:
# f(session, customers) -> {customer_id: contact dict}. Called once per bulk load.
CONTACT_RESOLVERS: dict[str, Any] = {}


@dataclass
class Question:
    customer_id: int | None
    topic_key: str
    channel: str


def load_facts(
    session: Session,
    customers: Iterable[Person],
    pairs: Iterable[tuple[str, str]],
    at: datetime,
    *,
    default_timezone: str = "UTC",
) -> dict[tuple[int, str, str], Facts]:
    """Facts for every customer × (topic, channel) asked, in a constant number of queries."""
    by_id = {c.id: c for c in customers}
    pairs = set(pairs)
    return _load_facts(session, by_id, pairs,
                       [(cid, t, ch) for cid in by_id for t, ch in pairs], at,
                       default_timezone=default_timezone)


def _load_facts(
    session: Reader,
    by_id: dict[int, Person],
    pairs: set[tuple[str, str]],
    wanted: Iterable[tuple[int, str, str]],
    at: datetime,
    *,
    default_timezone: str = "UTC",
) -> dict[tuple[int, str, str], Facts]:
    """Facts for exactly the ``wanted`` (customer id, topic, channel) keys."""
    if not by_id or not pairs:
        return {}
    return _facts_from_copies(session, by_id, pairs, wanted, copies_of(session, by_id), at,
                              default_timezone=default_timezone)


def copies_of(session: Reader, ids: Collection[int]) -> list[Copy]:
    """The copies of the facts of these customers who have any (:func:`index_facts`)."""
    if not ids:
        return []
    flushed(session)
    one = len(ids) == 1
    query = _fact_queries(dialect_of(session), one)["facts"]
    return (fetch_rows(session, query, {"ids": next(iter(ids))}) if one  # type: ignore[return-value]
            else fetch_rows_split(session, query, {"ids": list(ids)}, "ids"))


def _facts_from_copies(
    session: Reader,
    by_id: dict[int, Person],
    pairs: set[tuple[str, str]],
    wanted: Iterable[tuple[int, str, str]],
    copies: Iterable[Copy],
    at: datetime,
    *,
    default_timezone: str,
) -> dict[tuple[int, str, str], Facts]:
    """Facts for the ``wanted`` keys from the copies of those customers' facts."""
    topics = {t for t, _ in pairs} | {ANY}
    channels = {c for _, c in pairs} | {ANY}
    copies = copies if isinstance(copies, list) else list(copies)
    having = {cid for cid, raw in copies if raw is not None}
    states, suppressed, rules = index_facts(copies, topics, channels)
    capped = {cid for (cid, _), r in rules.items() if r.max_per_week}
    sends = recent_sends(session, capped, channels, at)
    resolved = {channel: resolve_contacts(session, channel, by_id.values())
                for channel in {c for _, c in pairs}}

    facts: dict[tuple[int, str, str], Facts] = {}
    get_state, get_suppressed, get_rule = states.get, suppressed.get, rules.get
    for key in wanted:
        if key in facts:
            continue
        cid, topic_key, channel = key
        if cid not in having:  # no copy: no state, suppression or rule to look for
            facts[key] = _assemble(by_id[cid], channel, None, None, None, None, None, (),
                                   resolved.get(channel), default_timezone)
            continue
        facts[key] = _assemble(
            by_id[cid], channel, get_state(key), get_state((cid, ANY, channel)),
            get_state((cid, ANY, ANY)), get_suppressed((cid, channel)),
            get_rule((cid, channel)), sends.get((cid, channel), ()), resolved.get(channel),
            default_timezone)
    return facts


def assemble_facts(
    customer: Person, channel: str, *, choice: Evidence | None, off: Evidence | None,
    paused: Evidence | None, suppressed: str | None, rule: Pressure | None,
    sends: Iterable[datetime], resolved: dict[int, dict[str, Any]] | None,
    default_timezone: str,
) -> Facts:
    """One person's Facts from what was read about them: the single place that turns rows into
    Facts, whether they came from :func:`load_facts` or from the audience export's joined
    query. ``rule`` carries the contact rule's cap and quiet hours; ``off`` and ``paused`` are
    the (*, channel) and (*, *) states, whatever their value."""
    return _assemble(customer, channel, choice, off, paused, suppressed, rule, sends, resolved,
                     default_timezone)


def _assemble(customer: Person, channel: str, choice: Evidence | None, off: Evidence | None,
              paused: Evidence | None, suppressed: str | None, rule: Pressure | None,
              sends: Iterable[datetime], resolved: dict[int, dict[str, Any]] | None,
              default_timezone: str) -> Facts:
    """:func:`assemble_facts` with positional arguments, for the loops that call it once per
    decision (keyword arguments cost a batch several milliseconds)."""
    return Facts(
        customer.erased_at is not None,
        suppressed,
        paused if paused is not None and paused.state == "withdrawn" else None,
        off if off is not None and off.state == "withdrawn" else None,
        choice,
        resolved.get(customer.id) if resolved is not None else contact_for(customer, channel),
        _NO_PRESSURE if rule is None else rule._replace(
            timezone=customer.timezone or default_timezone, recent_sends=tuple(sends)),
    )


def recent_sends(session: Reader, ids: Collection[int], channels: Collection[str],
                 at: datetime) -> dict[tuple[int, str], list[datetime]]:
    """Dispatches of the last week for people with a weekly cap (the cap reads only these)."""
    sends: dict[tuple[int, str], list[datetime]] = defaultdict(list)
    if ids:
        flushed(session)
        one = len(ids) == 1
        query = _fact_queries(dialect_of(session), one)["sends"]
        for cid, channel, sent_at in fetch_rows(session, query, {
                "ids": next(iter(ids)) if one else list(ids), "channels": list(channels),
                "since": at - WEEK,
                "until": at}):
            sends[(cid, channel)].append(sent_at)
    return sends


def resolve_contacts(session: Reader, channel: str, people: Iterable[Person]
                     ) -> dict[int, dict[str, Any]] | None:
    """Contact points of a channel kept outside the customer row (:data:`CONTACT_RESOLVERS`),
    or None when the customer row holds them."""
    resolver = CONTACT_RESOLVERS.get(channel)
    return None if resolver is None else resolver(session, list(people))  # type: ignore[no-any-return]


def decide_many(
    session: Reader,
    catalog: Catalog,
    questions: Sequence[tuple[Person | None, str, str]],
    at: datetime,
    *,
    default_timezone: str = "UTC",
    delivery: bool = True,
    copies: list[Copy] | None = None,
) -> list[Decision]:
    """Decide a list of (customer, topic, channel) questions, answers in the same order.
    Facts are loaded for the questions asked, not for every customer × every pair; or, with
    ``copies``, from those copies of the customers' facts, which must hold the copy of every
    customer asked about who has facts (:func:`people_with_facts`)."""
    customers: dict[int, Person] = {c.id: c for c, _, _ in questions if c is not None}
    pairs = {(t, ch) for c, t, ch in questions if c is not None}
    wanted = [(c.id, t, ch) for c, t, ch in questions if c is not None]
    if copies is None:
        facts = _load_facts(session, customers, pairs, wanted, at,
                            default_timezone=default_timezone)
    else:
        facts = _facts_from_copies(session, customers, pairs, wanted, copies, at,
                                   default_timezone=default_timezone) if customers else {}
    get_topic, get_facts = catalog.get, facts.get
    decider = Decider(at, delivery=delivery).decide
    return [
        decider(get_topic(t), ch, get_facts((c.id, t, ch)) if c is not None else None)
        for c, t, ch in questions
    ]


def requires_granted_choice(topic: TopicInfo, channel: str) -> bool:
    """True when only a recorded "granted" choice for exactly (topic, channel) can lead to
    "send" (:func:`decide`: not required and off by default). Bulk readers such as the audience
    export use it to narrow the rows they load; :func:`decide` still judges every one."""
    return not topic.required and not topic.defaults.get(channel, False)


def consent_matrix(
    session: Session, catalog: Catalog, customer: Person, at: datetime
) -> dict[tuple[str, str], Decision]:
    """Effective consent for every offered (topic, channel) of the catalog: the portal matrix."""
    pairs = [(t.key, ch) for t in catalog.ordered() for ch in t.channels]
    facts = load_facts(session, [customer], pairs, at)
    return {
        (t, ch): decide(catalog.get(t), ch, facts[(customer.id, t, ch)], at, delivery=False)
        for t, ch in pairs
    }
