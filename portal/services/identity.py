"""Who a sending system means: resolving identifiers (in bulk), creating and upserting
customers by external id, and merging two records of the same person.

A merged record keeps its id and history and points at the survivor (``merged_into_id``); every
lookup follows that pointer, so decisions about either record are decisions about the survivor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Select, select, tuple_, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.core.fast_rows import (
    Reader,
    dialect_of,
    fetch_rows,
    fetch_rows_split,
    flushed,
    read_ahead,
    reads_beside,
)
from portal.models.consent import ANY, ConsentState, ContactRule, Suppression
from portal.models.customer import Customer, ExternalId
from portal.outbox import changes
from portal.services.accounts import (
    AccountError,
    check_not_lookalike,
    create_customer,
    email_key,
    normalize_email,
    normalize_phone,
)
from portal.services.catalog import Catalog
from portal.services.consent import ConsentError, Proof, record_consent
from portal.services.decisions import (
    PERSON_COLUMNS,
    Copy,
    Decision,
    Guard,
    Person,
    PersonRow,
    among,
    copies_of,
    decide,
    decide_many,
    decide_one,
    people_with_facts,
    restrict_to,
)

KINDS = ("id", "email", "phone", "member_number", "external_id")
# withdrawn beats pending beats granted: on merge, the most restrictive choice survives.
RESTRICTIVENESS = {"withdrawn": 3, "pending": 2, "granted": 1}


class IdentityError(ValueError):
    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(message)
        self.code, self.field = code, field


@dataclass
class MemberNumberHook:
    """Filled by the loyalty aggregate: member numbers live with the loyalty account.
    ``find`` maps member numbers to customer ids, ``of`` customer ids to member numbers. Until
    it is filled, a member number names nobody (``unknown_customer``)."""

    find: Callable[[Reader, Sequence[str]], dict[str, int]] | None = None
    of: Callable[[Session, Sequence[int]], dict[int, str]] | None = None


member_numbers = MemberNumberHook()


# Plain ASCII addresses: what validate_email would return, lowercased, without running it.
# Only IDNA ("xn--" labels are shown decoded) and quoted local parts (refused, so kept as
# given) could differ, and those take the full path. tests/unit/test_identity_lookup.py
# compares both on generated addresses.
_PLAIN_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]+")


def _email(raw: str) -> str:
    stripped = raw.strip()
    if stripped.isascii() and _PLAIN_EMAIL.fullmatch(stripped) \
            and "xn--" not in stripped.lower():
        return stripped.lower()
    return email_key(raw)


def _phone(raw: str) -> str:
    try:
        return normalize_phone(raw)
    except AccountError:
        return raw.strip()


def _find(session: Reader, refs: Sequence[dict[str, Any]], columns: tuple[Any, ...]
          ) -> tuple[list[tuple[str, Any] | None], dict[tuple[str, Any], Any]]:
    """Lookup keys in the order of ``refs`` and the rows (``columns``, the first being the
    customer id) they name, before following merges."""
    wanted: dict[str, set[Any]] = {k: set() for k in KINDS}
    keys: list[tuple[str, Any] | None] = []
    for ref in refs:
        if not ref:
            keys.append(None)
            continue
        kind, value = _lookup_key(ref)
        keys.append((kind, value))
        wanted[kind].add(value)

    found: dict[tuple[str, Any], Any] = {}
    flushed(session)
    dialect = dialect_of(session)
    width = len(columns)
    for kind in LOOKUP_COLUMNS:
        if wanted[kind]:
            values = wanted[kind]
            one = len(values) == 1
            query = _lookup(dialect, kind, columns, one)
            for row in (fetch_rows(session, query, {"values": next(iter(values))}) if one
                        else fetch_rows_split(session, query, {"values": list(values)},
                                              "values")):
                found[(kind, row[width])] = row[:width]
    ids: dict[tuple[str, Any], int] = {}
    if wanted["external_id"]:
        for cid, ns, value in session.execute(
            select(ExternalId.customer_id, ExternalId.namespace, ExternalId.value).where(
                tuple_(ExternalId.namespace, ExternalId.value).in_(list(wanted["external_id"])))
        ):
            ids[("external_id", (ns, value))] = cid
    if wanted["member_number"] and member_numbers.find is not None:
        for number, cid in member_numbers.find(session, list(wanted["member_number"])).items():
            ids[("member_number", number)] = cid
    if ids:
        rows = {row[0]: row for row in session.execute(
            select(*columns).where(among(session, Customer.id, set(ids.values()))))}
        found.update({key: rows[cid] for key, cid in ids.items() if cid in rows})
    return keys, found


LOOKUP_COLUMNS = {"id": Customer.public_id, "email": Customer.email, "phone": Customer.phone}


def _lookup_key(ref: dict[str, Any]) -> tuple[str, Any]:
    """(kind, normalized value) of an identifier object."""
    kind, value = next(iter(ref.items()))
    if kind == "email":
        value = _email(value)
    elif kind == "phone":
        value = _phone(value)
    elif kind == "external_id":
        value = (value["namespace"], value["value"])
    return kind, value


def column_lookup(ref: dict[str, Any]) -> tuple[str, Any] | None:
    """(customer column, normalized value) for an identifier held on the customer row (id,
    email, phone), which a single decision reads together with the facts; None for member
    numbers and external ids, which live in other tables."""
    kind, value = _lookup_key(ref)
    column = LOOKUP_COLUMNS.get(kind)
    return None if column is None else (column.key, value)


@cache
def _lookup(dialect: str, kind: str, columns: tuple[Any, ...], one: bool) -> Select[Any]:
    """Built once per dialect: the lookup of every decision request (``one``: of one value)."""
    column = LOOKUP_COLUMNS[kind]
    return restrict_to(dialect, select(*columns, column.label("looked_up")), column, "values",
                       one=one)


def resolve_many(session: Session, refs: Sequence[dict[str, Any]]) -> list[Customer | None]:
    """Customers for identifier objects (``{"email": ...}``, ``{"external_id": {...}}``...),
    in order, following merges. A constant number of queries whatever the length."""
    keys, found = _find(session, refs, (Customer.id,))
    customers = _load_following_merges(session, {row[0] for row in found.values()})
    return [customers.get(found[key][0]) if key in found else None  # type: ignore[index]
            for key in keys]


def resolve_people(session: Reader, refs: Sequence[dict[str, Any]]) -> list[Person | None]:
    """Like :func:`resolve_many`, for decisions: rows of the columns the precedence reads
    (:data:`~portal.services.decisions.PERSON_COLUMNS`) instead of Customer objects, in the
    lookup query itself, so 10,000 identifiers cost one query and no ORM objects."""
    keys, found = _find(session, refs, PERSON_COLUMNS)
    people = {key: PersonRow._make(row) for key, row in found.items()}
    merged = {row.merged_into_id for row in people.values() if row.merged_into_id}
    if merged:
        survivors = {row.id: PersonRow._make(row) for row in session.execute(
            select(*PERSON_COLUMNS).where(among(session, Customer.id, merged)))}
        people = {key: survivors.get(row.merged_into_id, row) if row.merged_into_id else row
                  for key, row in people.items()}
    return [people.get(key) if key else None for key in keys]


# A long batch is read and decided in parts of this many questions, each part's reads running
# while the ones before are decided (fast_rows.read_ahead); the first part is a fifth of that,
# so that deciding starts sooner. At most 9 parts for the largest batch (10,000 questions), so
# the number of statements stays bounded whatever the number of questions.
PART = 1_250


def decide_batch(session: Reader, catalog: Catalog,
                 questions: Sequence[tuple[dict[str, Any], str, str]], at: datetime, *,
                 default_timezone: str = "UTC") -> list[Decision]:
    """Decisions for (identifier object, topic, channel) questions, in order. People named by
    id, email or phone are found with their facts in one statement per kind of identifier
    (:func:`~portal.services.decisions.people_with_facts`); member numbers and external ids
    are resolved first, then their facts read. A constant number of statements whatever the
    number of questions: on PostgreSQL outside a transaction, the same for each part of
    :data:`PART` questions, a part's reads overlapping the decisions of the part before."""
    keys = [_lookup_key(ref) if ref else None for ref in (q[0] for q in questions)]
    n = len(questions)
    if reads_beside(session) and n > PART:
        first = PART // 5
        parts = [range(0, first)] + [range(start, min(start + PART, n))
                                     for start in range(first, n, PART)]
    else:
        parts = [range(0, n)] if n else []

    def read(reader: Reader, part: range) -> tuple[dict[tuple[str, Any], Person], list[Copy]]:
        by_kind: dict[str, set[Any]] = {}
        elsewhere: list[dict[str, Any]] = []
        for index in part:
            key = keys[index]
            if key is None:
                continue
            if key[0] in LOOKUP_COLUMNS:
                by_kind.setdefault(key[0], set()).add(key[1])
            else:
                elsewhere.append(questions[index][0])
        people: dict[tuple[str, Any], Person] = {}
        copies: list[Copy] = []
        for kind, values in by_kind.items():
            found, copied = people_with_facts(reader, LOOKUP_COLUMNS[kind].key, list(values))
            people.update(((kind, value), person) for value, person in found.items())
            copies += copied
        if elsewhere:
            resolved = resolve_people(reader, elsewhere)
            people.update((_lookup_key(ref), person) for ref, person
                          in zip(elsewhere, resolved, strict=True) if person is not None)
            copies += copies_of(reader, {p.id for p in resolved if p is not None})
        return people, copies

    decided: list[Decision] = []
    for part, (people, copies) in zip(parts, read_ahead(session, read, parts), strict=True):
        decided += decide_many(
            session, catalog,
            [(people.get(key) if (key := keys[index]) is not None else None,
              questions[index][1], questions[index][2]) for index in part],
            at, default_timezone=default_timezone, copies=copies)
    return decided


def decide_about(session: Reader, catalog: Catalog, ref: dict[str, Any], topic_key: str,
                 channel: str, at: datetime, *, default_timezone: str = "UTC",
                 guard: Guard | None = None, guard_params: dict[str, Any] | None = None
                 ) -> tuple[Decision, list[dict[str, Any]]]:
    """The single decision about the customer ``ref`` names, and the rows of the ``guard``
    (see :class:`~portal.services.decisions.Guard`): with an identifier held on the customer
    row, guard, person and facts in one statement (:func:`decide_one`); with a member number
    or an external id, the guard first (nobody is looked up unless it holds), then the
    customer, then the decision."""
    lookup = column_lookup(ref)
    if lookup is not None:
        _, decision, guarded = decide_one(session, catalog, *lookup, topic_key, channel, at,
                                          default_timezone=default_timezone, guard=guard,
                                          guard_params=guard_params)
        return decision, guarded
    guarded = []
    if guard is not None:
        guarded = [dict(zip(guard.rows.selected_columns.keys(), row, strict=True))
                   for row in fetch_rows(session, guard.rows, guard_params)]
        if not guarded:
            return decide(catalog.get(topic_key), channel, None, at), guarded
    [customer] = resolve_people(session, [ref])
    [result] = decide_many(session, catalog, [(customer, topic_key, channel)], at,
                           default_timezone=default_timezone)
    return result, guarded


def _load_following_merges(session: Session, ids: set[int]) -> dict[int, Customer]:
    """id -> the customer decisions are about (the survivor when merged). Merges always point
    at the final survivor (see :func:`merge`), so one hop is enough."""
    if not ids:
        return {}
    rows = {c.id: c for c in session.scalars(select(Customer).where(Customer.id.in_(ids)))}
    survivors_needed = {c.merged_into_id for c in rows.values() if c.merged_into_id}
    survivors = {c.id: c for c in session.scalars(
        select(Customer).where(Customer.id.in_(survivors_needed)))} if survivors_needed else {}
    return {cid: survivors.get(c.merged_into_id, c) if c.merged_into_id else c
            for cid, c in rows.items()}


def resolve(session: Session, ref: dict[str, Any]) -> Customer | None:
    return resolve_many(session, [ref])[0]


def by_public_id(session: Session, public_id: str) -> Customer | None:
    return resolve(session, {"id": public_id})


def history_ids(session: Session, customer: Customer) -> list[int]:
    """The customer's id and every record merged into it: history shows both."""
    merged = session.scalars(select(Customer.id).where(Customer.merged_into_id == customer.id))
    return [customer.id, *merged]


def as_json(session: Session, customers: Sequence[Customer]) -> list[dict[str, Any]]:
    ids = [c.id for c in customers]
    externals: dict[int, list[dict[str, str]]] = {i: [] for i in ids}
    if ids:
        for row in session.scalars(select(ExternalId).where(ExternalId.customer_id.in_(ids))
                                   .order_by(ExternalId.id)):
            externals[row.customer_id].append({"namespace": row.namespace, "value": row.value})
    numbers = member_numbers.of(session, ids) if member_numbers.of and ids else {}
    return [{
        "id": c.public_id, "email": c.email, "phone": c.phone,
        "postal_address": c.postal_address, "locale": c.locale, "timezone": c.timezone,
        "external_ids": externals[c.id], "member_number": numbers.get(c.id),
        "created_at": c.created_at.isoformat(), "erased": c.erased_at is not None,
    } for c in customers]


def _clean_contact(session: Session, data: dict[str, Any], customer: Customer | None) -> None:
    for name, normalize in (("email", normalize_email), ("phone", normalize_phone)):
        if data.get(name):
            data[name] = normalize(data[name])
            column = getattr(Customer, name)
            other = session.scalars(select(Customer).where(column == data[name])).first()
            if other is not None and other is not customer:
                raise IdentityError(f"{name}_taken", name, f"this {name} belongs to another "
                                    "customer")
    if data.get("email"):
        try:
            check_not_lookalike(session, data["email"], customer)
        except AccountError as exc:
            raise IdentityError("email_lookalike", "email", "this email differs from another "
                                "customer's only by look-alike letters") from exc


def _add_external_ids(session: Session, customer: Customer, items: list[dict[str, str]]) -> None:
    for index, item in enumerate(items):
        existing = session.scalars(select(ExternalId).where(
            ExternalId.namespace == item["namespace"], ExternalId.value == item["value"])).first()
        if existing is None:
            session.add(ExternalId(customer_id=customer.id, namespace=item["namespace"],
                                   value=item["value"]))
        elif existing.customer_id != customer.id:
            raise IdentityError("external_id_taken", f"external_ids[{index}]",
                                "this external id belongs to another customer")


def create(session: Session, data: dict[str, Any]) -> Customer:
    """A customer from a sending system. Raises IdentityError (409) when a contact point or
    external id is already someone's."""
    data = dict(data)
    _clean_contact(session, data, None)
    customer = create_customer(
        session, data.get("email"), phone=data.get("phone"), locale=data.get("locale"),
        timezone=data.get("timezone"), postal_address=data.get("postal_address"), source="api")
    _add_external_ids(session, customer, data.get("external_ids") or [])
    session.flush()
    return customer


def upsert_external(session: Session, namespace: str, value: str,
                    data: dict[str, Any]) -> tuple[Customer, bool]:
    """Create or update the customer another system knows as ``namespace:value``."""
    customer = resolve(session, {"external_id": {"namespace": namespace, "value": value}})
    if customer is None:
        # Not known by this id yet, but perhaps by its email or phone: attach, don't duplicate.
        known = {c.id: c for c in resolve_many(session, [
            {k: data[k]} for k in ("email", "phone") if data.get(k)]) if c is not None}
        if len(known) > 1:
            raise IdentityError("email_taken", "email", "email and phone belong to different "
                                "customers")
        if known:
            customer = next(iter(known.values()))
            session.add(ExternalId(customer_id=customer.id, namespace=namespace, value=value))
            session.flush()
    if customer is None:
        extra = [e for e in data.get("external_ids") or []
                 if (e["namespace"], e["value"]) != (namespace, value)]
        created = create(session, {**data, "external_ids": [
            {"namespace": namespace, "value": value}, *extra]})
        return created, True
    data = dict(data)
    _clean_contact(session, data, customer)
    changed = []
    for name in ("email", "phone", "postal_address", "locale", "timezone"):
        if name in data and getattr(customer, name) != data[name]:
            setattr(customer, name, data[name])
            changed.append(name)
    _add_external_ids(session, customer, data.get("external_ids") or [])
    session.flush()
    if changed:
        changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                                   "fields": changed, "source": "api"},
                     customer.id)
    return customer, False


def merge(session: Session, catalog: Catalog, survivor: Customer, merged: Customer,
          actor: str) -> None:
    """Fold ``merged`` into ``survivor``. Per (topic, channel) and per switch the most
    restrictive choice wins and is recorded on the survivor as a ``merge`` event; suppressions,
    contact rules, external ids and missing contact points move over; both histories stay."""
    if survivor.id == merged.id:
        raise IdentityError("same_customer", "merged", "cannot merge a customer into itself")
    if merged.merged_into_id is not None or survivor.merged_into_id is not None:
        raise IdentityError("already_merged", "merged", "a record was already merged")
    if survivor.erased_at is not None or merged.erased_at is not None:
        raise IdentityError("erased", "merged", "an erased customer cannot be merged")
    states: dict[int, dict[tuple[str, str], ConsentState]] = {survivor.id: {}, merged.id: {}}
    for row in session.scalars(select(ConsentState).where(
            ConsentState.customer_id.in_([survivor.id, merged.id]))):
        states[row.customer_id][(row.topic_key, row.channel)] = row
    proof = Proof(source="merge", actor=actor)
    for key, theirs in sorted(states[merged.id].items()):
        ours = states[survivor.id].get(key)
        if ours is not None and RESTRICTIVENESS[ours.state] >= RESTRICTIVENESS[theirs.state]:
            continue
        topic, channel = key
        if topic == ANY and theirs.state == "pending":
            continue
        try:
            record_consent(session, survivor, topic, channel, theirs.state, proof,
                           catalog=catalog)
        except ConsentError:
            continue  # a topic no longer offered: the merged record's history still shows it
    for s in session.scalars(select(Suppression).where(Suppression.customer_id == merged.id,
                                                       Suppression.lifted_at.is_(None))):
        session.add(Suppression(customer_id=survivor.id, channel=s.channel, reason=s.reason,
                                address=s.address, source="merge"))
    rules = {r.channel: r for r in session.scalars(
        select(ContactRule).where(ContactRule.customer_id == survivor.id))}
    for r in session.scalars(select(ContactRule).where(ContactRule.customer_id == merged.id)):
        if r.channel not in rules:
            session.add(ContactRule(customer_id=survivor.id, channel=r.channel,
                                    max_per_week=r.max_per_week, quiet_start=r.quiet_start,
                                    quiet_end=r.quiet_end))
    session.execute(update(ExternalId).where(ExternalId.customer_id == merged.id)
                    .values(customer_id=survivor.id))
    moved = []
    for name in ("email", "phone", "postal_address"):
        if getattr(survivor, name) is None and getattr(merged, name) is not None:
            value = getattr(merged, name)
            setattr(merged, name, None)
            session.flush()
            setattr(survivor, name, value)
            moved.append(name)
    merged.merged_into_id = survivor.id
    merged.updated_at = utcnow()
    # Records merged earlier into ``merged`` now point at the final survivor.
    session.execute(update(Customer).where(Customer.merged_into_id == merged.id,
                                           Customer.id != merged.id)
                    .values(merged_into_id=survivor.id))
    session.flush()
    changes.emit(session, "customer.merged", {"customer": survivor.public_id,
                                              "merged": merged.public_id,
                                              "moved_fields": moved, "actor": actor},
                 survivor.id)
