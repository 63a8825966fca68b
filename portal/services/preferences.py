"""Turning what a person ticked on the preference page into consent events, and their contact
points and contact pressure into rows. Only what changed is recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import time
from zoneinfo import available_timezones

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.models.consent import ANY, ContactRule
from portal.models.customer import Customer
from portal.outbox import changes
from portal.services.accounts import AccountError, normalize_phone
from portal.services.catalog import Catalog
from portal.services.consent import Proof, current_states, lock_customer, record_consent

TIMEZONES = frozenset(available_timezones())


@dataclass(frozen=True)
class Wanted:
    """The whole page as submitted."""

    cells: frozenset[tuple[str, str]]       # (topic, channel) switched on
    channels_off: frozenset[str]
    paused: bool


@dataclass
class Applied:
    recorded: int = 0
    pending_email_topics: list[str] = field(default_factory=list)
    # Marketing email switched on while the address is not confirmed: nothing recorded.
    held_email_topics: list[str] = field(default_factory=list)


def offered_channels(catalog: Catalog) -> list[str]:
    seen: list[str] = []
    for topic in catalog.ordered():
        seen.extend(ch for ch in topic.channels if ch not in seen)
    from portal.models.catalog import CHANNELS

    return [ch for ch in CHANNELS if ch in seen]


def cell_is_on(states: dict[tuple[str, str], str], catalog: Catalog, topic: str,
               channel: str) -> bool:
    """What the switch shows: the person's own choice (pending counts as on), else default."""
    state = states.get((topic, channel))
    if state is not None:
        return state in ("granted", "pending")
    info = catalog.get(topic)
    return bool(info and info.defaults.get(channel, False))


def apply_preferences(
    session: Session,
    customer: Customer,
    catalog: Catalog,
    wanted: Wanted,
    proof: Proof,
    *,
    double_opt_in: bool,
    email_confirmed: bool = True,
) -> Applied:
    """Record an event for every switch that changed. Marketing email switched on becomes
    *pending* under double opt-in; the caller emails the confirmation link. While the
    address is not confirmed (``email_confirmed`` false) marketing email is not switched on
    at all, neither granted nor pending: the account may hold someone else's address, whose
    owner never asked for anything. Those topics are listed in ``held_email_topics``.

    The customer row is locked before the current states are read: two saves at once would
    otherwise both compare against the same old states, and the later one could find
    "nothing changed" where the earlier one had just changed it, losing that person's choice.
    """
    lock_customer(session, customer.id)
    states = current_states(session, customer)
    applied = Applied()

    def record(topic: str, channel: str, state: str) -> None:
        record_consent(session, customer, topic, channel, state, proof, catalog=catalog)
        applied.recorded += 1

    paused_now = states.get((ANY, ANY)) == "withdrawn"
    if wanted.paused != paused_now:
        record(ANY, ANY, "withdrawn" if wanted.paused else "granted")
    for channel in offered_channels(catalog):
        off_now = states.get((ANY, channel)) == "withdrawn"
        off = channel in wanted.channels_off
        if off != off_now:
            record(ANY, channel, "withdrawn" if off else "granted")
    for topic in catalog.ordered():
        if topic.required:
            continue
        for channel in topic.channels:
            on = (topic.key, channel) in wanted.cells
            if on == cell_is_on(states, catalog, topic.key, channel):
                continue
            if not on:
                record(topic.key, channel, "withdrawn")
            elif not email_confirmed and topic.marketing and channel == "email":
                applied.held_email_topics.append(topic.key)
            elif double_opt_in and topic.marketing and channel == "email":
                record(topic.key, channel, "pending")
                applied.pending_email_topics.append(topic.key)
            else:
                record(topic.key, channel, "granted")
    return applied


def confirm_pending_email(session: Session, customer: Customer, catalog: Catalog,
                          topics: list[str], proof: Proof) -> list[str]:
    """Follow-up of the double opt-in link: pending email consents become granted."""
    lock_customer(session, customer.id)
    states = current_states(session, customer)
    confirmed = []
    for topic in topics:
        if states.get((topic, "email")) == "pending" and catalog.get(topic) is not None:
            record_consent(session, customer, topic, "email", "granted", proof, catalog=catalog)
            confirmed.append(topic)
    return confirmed


def update_contact_points(session: Session, customer: Customer, *, phone: str | None,
                          postal_address: str | None, region: str | None) -> list[str]:
    changed = []
    new_phone = normalize_phone(phone, region) if phone and phone.strip() else None
    if new_phone != customer.phone:
        if new_phone and session.scalars(
            select(Customer).where(Customer.phone == new_phone, Customer.id != customer.id)
        ).first():
            raise AccountError("phone_taken", "phone")
        customer.phone = new_phone
        changed.append("phone")
    address = (postal_address or "").strip() or None
    if address is not None and len(address) > 500:
        raise AccountError("address_too_long", "postal_address")
    if address is not None and "\x00" in address:  # PostgreSQL text cannot hold NUL
        raise AccountError("invalid_character", "postal_address")
    if address != customer.postal_address:
        customer.postal_address = address
        changed.append("postal_address")
    if changed:
        changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                                   "fields": changed}, customer.id)
    return changed


@dataclass(frozen=True)
class PressureRule:
    max_per_week: int | None
    quiet_start: time | None
    quiet_end: time | None


def set_contact_pressure(session: Session, customer: Customer, timezone: str,
                         rules: dict[str, PressureRule]) -> None:
    if timezone not in TIMEZONES:
        raise AccountError("invalid_timezone", "timezone")
    customer.timezone = timezone
    existing = {
        r.channel: r
        for r in session.scalars(select(ContactRule).where(ContactRule.customer_id ==
                                                           customer.id))
    }
    for channel, rule in rules.items():
        if rule.max_per_week is not None and not 1 <= rule.max_per_week <= 100:
            raise AccountError("invalid_cap", f"cap_{channel}")
        if (rule.quiet_start is None) != (rule.quiet_end is None):
            raise AccountError("incomplete_quiet_hours", f"quiet_{channel}")
        row = existing.get(channel)
        if row is None:
            row = ContactRule(customer_id=customer.id, channel=channel)
            session.add(row)
        row.max_per_week = rule.max_per_week
        row.quiet_start = rule.quiet_start
        row.quiet_end = rule.quiet_end
    changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                               "fields": ["contact_pressure"]}, customer.id)


def contact_pressure(session: Session, customer: Customer) -> dict[str, ContactRule]:
    return {
        r.channel: r
        for r in session.scalars(select(ContactRule).where(ContactRule.customer_id ==
                                                           customer.id))
    }
