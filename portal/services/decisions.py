"""The consent precedence: the one place that turns events, suppressions, contact rules and
the catalog into "may we send topic T to this person on channel C now?".

The portal's matrix, the decision API, audience exports and every fan-out (web push, wallet
messages) call :func:`decide`. The order of :data:`RULES` is the product's promise to the
people it protects, most restrictive first; ``docs/decisions.md`` explains each rule and the
table-driven test in ``tests/unit/test_decisions.py`` pins it down.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.models.consent import ANY, ConsentEvent, ConsentState, ContactRule, Dispatch, Suppression
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


@dataclass(frozen=True)
class Evidence:
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


@dataclass(frozen=True)
class Pressure:
    """Contact pressure for one channel, with the dispatches inside the last week."""

    max_per_week: int | None = None
    quiet_start: time | None = None
    quiet_end: time | None = None
    timezone: str = "UTC"
    recent_sends: tuple[datetime, ...] = ()


@dataclass(frozen=True)
class Facts:
    """Everything known of one person for one (topic, channel) question."""

    erased: bool = False
    suppressed: str | None = None           # the suppression reason
    paused: Evidence | None = None          # (*, *) withdrawn
    channel_off: Evidence | None = None     # (*, channel) withdrawn
    choice: Evidence | None = None          # (topic, channel) latest event
    contact: dict[str, Any] | None = None   # None: no way to reach them on this channel
    pressure: Pressure = field(default_factory=Pressure)


@dataclass(frozen=True)
class Decision:
    decision: Verdict
    reason: str
    evidence: Evidence | None = None
    next_allowed_at: datetime | None = None
    contact: dict[str, Any] | None = None
    trace: tuple[tuple[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.decision == "send"


def _trace(trace: list[tuple[str, str]], rule: str, outcome: str) -> None:
    trace.append((rule, outcome))


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
    """
    trace: list[tuple[str, str]] = []

    def verdict(rule: str, decision: Verdict, reason: str, **kw: Any) -> Decision:
        _trace(trace, rule, reason)
        return Decision(decision, reason, trace=tuple(trace), **kw)

    if facts is None:
        return verdict("customer", "deny", "unknown_customer")
    _trace(trace, "customer", "pass")
    if topic is None:
        return verdict("topic", "deny", "unknown_topic")
    _trace(trace, "topic", "pass")
    if channel not in topic.channels:
        return verdict("channel_offered", "deny", "channel_not_offered")
    _trace(trace, "channel_offered", "pass")
    if facts.erased:
        return verdict("erased", "deny", "erased")
    _trace(trace, "erased", "pass")
    if facts.suppressed:
        return verdict("suppression", "deny", "suppressed")
    _trace(trace, "suppression", "pass")

    consent: Decision | None = None
    if topic.required:
        _trace(trace, "required_service", "required_service")
        consent = Decision("send", "required_service")
    else:
        _trace(trace, "required_service", "pass")
        if topic.marketing and facts.paused is not None:
            return verdict("marketing_pause", "deny", "marketing_paused", evidence=facts.paused)
        _trace(trace, "marketing_pause", "pass")
        if facts.channel_off is not None:
            return verdict("channel_switch", "deny", "channel_off", evidence=facts.channel_off)
        _trace(trace, "channel_switch", "pass")
        choice = facts.choice
        if choice is not None:
            if choice.state == "granted":
                _trace(trace, "choice", "consented")
                consent = Decision("send", "consented", evidence=choice)
            elif choice.state == "pending":
                return verdict("choice", "deny", "pending_confirmation", evidence=choice)
            else:
                return verdict("choice", "deny", "withdrawn", evidence=choice)
        else:
            _trace(trace, "choice", "pass")
            if topic.defaults.get(channel, False):
                _trace(trace, "default", "consented")
                consent = Decision("send", "consented")
            else:
                return verdict("default", "deny", "not_consented")

    if not delivery:
        return Decision(consent.decision, consent.reason, consent.evidence, trace=tuple(trace))
    if facts.contact is None:
        return verdict("contact_point", "deny", "no_contact_point", evidence=consent.evidence)
    _trace(trace, "contact_point", "pass")
    if topic.marketing:
        blocked, next_at = _pressure(facts.pressure, at)
        if blocked is not None:
            for rule in ("quiet_hours", "frequency_cap"):
                _trace(trace, rule, blocked if rule == blocked else "pass")
                if rule == blocked:
                    break
            return Decision("defer", blocked, consent.evidence, next_at, facts.contact,
                            tuple(trace))
    _trace(trace, "quiet_hours", "pass")
    _trace(trace, "frequency_cap", "pass")
    return Decision("send", consent.reason, consent.evidence, None, facts.contact, tuple(trace))


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


def _evidence(event: ConsentEvent) -> Evidence:
    return Evidence(event.id, event.occurred_at, event.source, event.wording_version, event.state)


def contact_for(customer: Customer, channel: str) -> dict[str, Any] | None:
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
    customers: Iterable[Customer],
    pairs: Iterable[tuple[str, str]],
    at: datetime,
    *,
    default_timezone: str = "UTC",
) -> dict[tuple[int, str, str], Facts]:
    """Facts for every customer × (topic, channel) asked, in a constant number of queries."""
    by_id = {c.id: c for c in customers}
    pairs = set(pairs)
    if not by_id or not pairs:
        return {}
    ids = list(by_id)
    topics = {t for t, _ in pairs} | {ANY}
    channels = {c for _, c in pairs} | {ANY}

    states: dict[tuple[int, str, str], Evidence] = {}
    rows = session.execute(
        select(ConsentState.customer_id, ConsentState.topic_key, ConsentState.channel,
               ConsentEvent)
        .join(ConsentEvent, ConsentEvent.id == ConsentState.event_id)
        .where(ConsentState.customer_id.in_(ids), ConsentState.topic_key.in_(topics),
               ConsentState.channel.in_(channels))
    )
    for cid, topic_key, channel, event in rows:
        states[(cid, topic_key, channel)] = _evidence(event)

    suppressed: dict[tuple[int, str], str] = {}
    for cid, channel, reason in session.execute(
        select(Suppression.customer_id, Suppression.channel, Suppression.reason).where(
            Suppression.customer_id.in_(ids), Suppression.lifted_at.is_(None),
            Suppression.channel.in_(channels),
        )
    ):
        suppressed.setdefault((cid, channel), reason)

    rules: dict[tuple[int, str], ContactRule] = {
        (r.customer_id, r.channel): r
        for r in session.scalars(
            select(ContactRule).where(ContactRule.customer_id.in_(ids),
                                      ContactRule.channel.in_(channels))
        )
    }
    sends: dict[tuple[int, str], list[datetime]] = defaultdict(list)
    capped = [cid for (cid, _), r in rules.items() if r.max_per_week]
    if capped:
        for cid, channel, sent_at in session.execute(
            select(Dispatch.customer_id, Dispatch.channel, Dispatch.sent_at).where(
                Dispatch.customer_id.in_(set(capped)), Dispatch.channel.in_(channels),
                Dispatch.sent_at > at - WEEK, Dispatch.sent_at <= at,
            )
        ):
            sends[(cid, channel)].append(sent_at)

    resolved: dict[str, dict[int, dict[str, Any]]] = {}
    for channel in {c for _, c in pairs}:
        resolver = CONTACT_RESOLVERS.get(channel)
        if resolver is not None:
            resolved[channel] = resolver(session, list(by_id.values()))

    facts: dict[tuple[int, str, str], Facts] = {}
    for cid, customer in by_id.items():
        for topic_key, channel in pairs:
            rule = rules.get((cid, channel))
            pressure = Pressure()
            if rule is not None:
                pressure = Pressure(
                    max_per_week=rule.max_per_week,
                    quiet_start=rule.quiet_start,
                    quiet_end=rule.quiet_end,
                    timezone=customer.timezone or default_timezone,
                    recent_sends=tuple(sends.get((cid, channel), ())),
                )
            paused = states.get((cid, ANY, ANY))
            off = states.get((cid, ANY, channel))
            contact = (
                resolved[channel].get(cid) if channel in resolved
                else contact_for(customer, channel)
            )
            facts[(cid, topic_key, channel)] = Facts(
                erased=customer.erased_at is not None,
                suppressed=suppressed.get((cid, channel)),
                paused=paused if paused and paused.state == "withdrawn" else None,
                channel_off=off if off and off.state == "withdrawn" else None,
                choice=states.get((cid, topic_key, channel)),
                contact=contact,
                pressure=pressure,
            )
    return facts


def decide_many(
    session: Session,
    catalog: Catalog,
    questions: list[tuple[Customer | None, str, str]],
    at: datetime,
    *,
    default_timezone: str = "UTC",
    delivery: bool = True,
) -> list[Decision]:
    """Decide a list of (customer, topic, channel) questions, answers in the same order."""
    customers = {c.id: c for c, _, _ in questions if c is not None}
    pairs = {(t, ch) for c, t, ch in questions if c is not None}
    facts = load_facts(session, customers.values(), pairs, at,
                       default_timezone=default_timezone)
    return [
        decide(catalog.get(t), ch, facts.get((c.id, t, ch)) if c is not None else None, at,
               delivery=delivery)
        for c, t, ch in questions
    ]


def requires_granted_choice(topic: TopicInfo, channel: str) -> bool:
    """True when only a recorded "granted" choice for exactly (topic, channel) can lead to
    "send" (:func:`decide`: not required and off by default). Bulk readers such as the audience
    export use it to narrow the rows they load; :func:`decide` still judges every one."""
    return not topic.required and not topic.defaults.get(channel, False)


def consent_matrix(
    session: Session, catalog: Catalog, customer: Customer, at: datetime
) -> dict[tuple[str, str], Decision]:
    """Effective consent for every offered (topic, channel) of the catalog: the portal matrix."""
    pairs = [(t.key, ch) for t in catalog.ordered() for ch in t.channels]
    facts = load_facts(session, [customer], pairs, at)
    return {
        (t, ch): decide(catalog.get(t), ch, facts[(customer.id, t, ch)], at, delivery=False)
        for t, ch in pairs
    }
