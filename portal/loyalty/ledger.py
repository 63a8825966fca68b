"""The loyalty ledger: enrollment, earning, redeeming, adjusting, reversing, leaving.

Every write goes through :func:`_post` with the member row locked (``SELECT ... FOR UPDATE``
on PostgreSQL), so concurrent accruals are serialised per member: no lost balance update, no
double spend. Within that lock the entry is appended, lots are consumed oldest first, the cached
balance moves by exactly the entry's points, the tier is recomputed from the points earned in
the rolling window, and the change feed gets ``loyalty.points_changed`` (and
``loyalty.tier_changed``). Points already past their expiry are expired first, so a debit never
spends them. Services never commit: callers own the transaction.

Decisions worth knowing:

* Joining records acceptance of the programme terms (a contract) in :class:`TermsAcceptance`
  and the change feed. It does not grant the marketing topic "loyalty": news about points is
  marketing and needs its own opt-in on the preference page.
* Reversing an earn takes back all of its points, even when some were already spent: the points
  come from the earn's own lot, then from the other lots oldest first, and what is still
  missing leaves the balance negative. That debt is paid by the next credits before anything
  else (an allocation from the new lot to the reversal). A refund must not let a customer keep
  points for goods they returned, and the ledger stays truthful.
* Reversing a redeem gives the points back to the lots they came from, with their original
  expiry; points whose lot has expired meanwhile expire again at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from portal.core.db import utcnow
from portal.loyalty.models import LedgerEntry, Lot, LotAllocation, Member, TermsAcceptance
from portal.loyalty.program import LoyaltyProgram, Tier, record_terms
from portal.models.customer import Customer
from portal.outbox import changes
from portal.services.consent import SOURCES, Proof

MAX_POINTS = 10_000_000
CREDIT_KINDS = ("earn", "adjust")
EXPIRING_SOON = timedelta(days=30)
# ``Member.next_expiry_at`` when no open lot expires at all.
NO_EXPIRY = datetime(9999, 1, 1, tzinfo=UTC)
_LOCKS = "carnet.loyalty.locks"


class LoyaltyError(ValueError):
    """A ledger operation that cannot happen; ``code`` is stable for the API's problem types."""

    code = "loyalty_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotAMember(LoyaltyError):
    code = "not_a_member"


class AlreadyMember(LoyaltyError):
    code = "already_member"


class TermsNotAccepted(LoyaltyError):
    code = "terms_not_accepted"


class InvalidEntry(LoyaltyError):
    code = "invalid_entry"


class InsufficientPoints(LoyaltyError):
    code = "insufficient_points"

    def __init__(self, balance: int, requested: int) -> None:
        super().__init__(f"{requested} points requested but the balance is {balance}", "points")
        self.balance = balance
        self.requested = requested


class DuplicateSourceRef(LoyaltyError):
    """This member already earned for that source (order); the API answers 409."""

    code = "duplicate_source_ref"

    def __init__(self, entry: LedgerEntry) -> None:
        super().__init__(f"points were already earned for '{entry.source_ref}'", "source_ref")
        self.entry = entry


class NotReversible(LoyaltyError):
    code = "not_reversible"


# --- reading -----------------------------------------------------------------------------------


def member_for(session: Session, customer: Customer) -> Member | None:
    return session.scalars(select(Member).where(Member.customer_id == customer.id)).first()


def active_member_for(session: Session, customer: Customer) -> Member | None:
    member = member_for(session, customer)
    return member if member is not None and member.left_at is None else None


def find_by_number(session: Session, number: str) -> Member | None:
    return session.scalars(select(Member).where(Member.member_number == number)).first()


def lock_by_number(session: Session, number: str) -> Member | None:
    """The member with this number, row-locked for the rest of the transaction (and its
    customer loaded): finding and locking a member before a ledger write is one statement."""
    return _locked(session, Member.member_number == number)


def entries(session: Session, member: Member, limit: int = 200) -> list[LedgerEntry]:
    """Newest first."""
    return list(session.scalars(
        select(LedgerEntry).where(LedgerEntry.member_id == member.id)
        .order_by(LedgerEntry.occurred_at.desc(), LedgerEntry.id.desc()).limit(limit)))


def earned_in_window(session: Session, program: LoyaltyProgram, member_ids: Sequence[int],
                     now: datetime) -> dict[int, int]:
    """Points earned per member in the tier window, net of reversed earns.

    The window starts ``tier_window_months`` before ``now``, or at enrollment if later (a
    member who left and came back starts afresh). Adjustments do not count: tiers reward
    purchases. This is the one place the tier rule reads the ledger; the per-entry path and
    the nightly recomputation both call it.
    """
    if not member_ids:
        return {}
    rows = session.execute(_window_query(program, member_ids, now))
    earned = {member_id: 0 for member_id in member_ids}
    earned.update({member_id: int(total or 0) for member_id, total, _ in rows})
    return earned


def _window_query(program: LoyaltyProgram, member_ids: Sequence[int], now: datetime) -> Any:
    """(member id, points earned in the window, oldest earn counted) per member."""
    reversal = aliased(LedgerEntry)
    return (
        select(LedgerEntry.member_id, func.sum(LedgerEntry.points),
               func.min(LedgerEntry.occurred_at))
        .join(Member, Member.id == LedgerEntry.member_id)
        .where(
            LedgerEntry.member_id.in_(member_ids),
            LedgerEntry.kind == "earn",
            LedgerEntry.occurred_at > program.window_start(now),
            LedgerEntry.occurred_at >= Member.enrolled_at,
            LedgerEntry.occurred_at <= now,
            ~exists().where(reversal.reverses_id == LedgerEntry.id),
        )
        .group_by(LedgerEntry.member_id)
    )


@dataclass(frozen=True)
class Progress:
    tier: Tier
    earned: int                  # in the window
    next_tier: Tier | None
    points_to_next: int          # 0 at the top tier
    percent: int                 # of the way from this tier's threshold to the next one


def progress(session: Session, program: LoyaltyProgram, member: Member,
             now: datetime | None = None) -> Progress:
    now = now or utcnow()
    earned = earned_in_window(session, program, [member.id], now)[member.id]
    tier = program.tier_for(earned)
    following = program.next_tier(earned)
    if following is None:
        return Progress(tier, earned, None, 0, 100)
    span = following.threshold - tier.threshold
    percent = min(100, max(0, (earned - tier.threshold) * 100 // span))
    return Progress(tier, earned, following, following.threshold - earned, percent)


def expiring_soon(session: Session, member: Member, now: datetime | None = None,
                  within: timedelta = EXPIRING_SOON) -> list[tuple[datetime, int]]:
    """(expiry moment, points) of the lots that expire within ``within``, soonest first."""
    now = now or utcnow()
    return [(lot.expires_at, lot.remaining) for lot in session.scalars(
        select(Lot).where(Lot.member_id == member.id, Lot.remaining > 0,
                          Lot.expires_at > now, Lot.expires_at <= now + within)
        .order_by(Lot.expires_at, Lot.entry_id)) if lot.expires_at is not None]


# --- enrollment --------------------------------------------------------------------------------


def _new_number(session: Session, program: LoyaltyProgram) -> str:
    """A Luhn-valid number no member row has ever held (rows are never deleted)."""
    for _ in range(50):
        candidate = program.number.generate()
        taken = session.scalar(select(exists().where(Member.member_number == candidate)))
        if not taken:
            return candidate
    raise LoyaltyError("could not find a free member number; widen the number format")


def _proof_digest(at: datetime, proof: Proof) -> str:
    material = "|".join([at.isoformat(), proof.ip or "", proof.user_agent or ""])
    return hashlib.sha256(material.encode()).hexdigest()


def enroll(session: Session, program: LoyaltyProgram, customer: Customer, terms_version: int,
           proof: Proof, *, at: datetime | None = None) -> Member:
    """Make the customer a member who accepted ``terms_version`` (the current version).

    A former member who comes back gets their own number again, a balance of zero (points
    were forfeited on leaving) and a tier window that starts at the new enrollment.
    """
    if customer.erased_at is not None:
        raise NotAMember("this customer was erased", "customer")
    if terms_version != program.terms.version:
        raise TermsNotAccepted(f"the current terms are version {program.terms.version}",
                               "terms_version")
    if proof.source not in SOURCES:
        raise LoyaltyError(f"unknown source '{proof.source}'", "source")
    wording = record_terms(session, program)
    # Serialise enrollments of one customer (two tabs, a double click).
    session.execute(select(Customer.id).where(Customer.id == customer.id).with_for_update())
    now = at or utcnow()
    member = session.scalars(select(Member).where(Member.customer_id == customer.id)
                             .execution_options(populate_existing=True)).first()
    rejoined = member is not None
    if member is not None:
        if member.left_at is None:
            raise AlreadyMember("already a member", "customer")
        member.left_at = None
        member.enrolled_at = now
        member.terms_version = terms_version
        member.tier = program.base_tier.key
        member.tier_changed_at = now
    else:
        member = Member(customer_id=customer.id, member_number=_new_number(session, program),
                        enrolled_at=now, terms_version=terms_version,
                        tier=program.base_tier.key, balance=0, lifetime_earned=0,
                        lifetime_redeemed=0, tier_changed_at=now, next_expiry_at=NO_EXPIRY)
        session.add(member)
    # Nothing earned before this enrollment counts towards a tier.
    member.window_earned, member.window_oldest_at = 0, None
    member.window_from = program.window_start(now)
    try:
        session.flush()
    except IntegrityError as exc:   # the same random number drawn twice at the same moment
        raise LoyaltyError("member number collision; try again") from exc
    session.add(TermsAcceptance(
        member_id=member.id, terms_version=wording.version, terms_hash=wording.hash,
        source=proof.source, actor=proof.actor[:120], proof_digest=_proof_digest(now, proof),
        ip=proof.ip, user_agent=(proof.user_agent or "")[:1000] or None, accepted_at=now))
    changes.emit(session, "loyalty.enrolled", {
        "customer": customer.public_id, "member_number": member.member_number,
        "tier": member.tier, "balance": member.balance, "terms_version": terms_version,
        "rejoined": rejoined, "occurred_at": now.isoformat(),
    }, customer.id)
    return member


def leave(session: Session, program: LoyaltyProgram | None, member: Member, *, actor: str,
          at: datetime | None = None) -> None:
    """End the membership. Remaining points are forfeited through an ``expire`` entry; a
    negative balance (debt) is written off through an ``adjust`` entry. The row stays, so
    the number is never given to anyone else.

    ``program`` is None when the catalog no longer defines the programme: erasure must end
    the membership all the same. The entries are written as usual, and the tier, which only
    the programme can name, is left as it was."""
    now = at or utcnow()
    _lock(session, member)
    _require_active(member)
    if member.balance > 0:
        _post(session, program, member, "expire", -member.balance,
              reason="forfeited: left the programme", actor=actor, now=now)
    elif member.balance < 0:
        _post(session, program, member, "adjust", -member.balance,
              reason="debt written off: left the programme", actor=actor, now=now)
    previous = member.tier
    member.left_at = now
    if program is not None:
        member.tier = program.base_tier.key
    if previous != member.tier:
        member.tier_changed_at = now
    changes.emit(session, "loyalty.left", {
        "customer": _public_id(session, member), "member_number": member.member_number,
        "balance": member.balance, "tier": member.tier, "occurred_at": now.isoformat(),
    }, member.customer_id)


# --- ledger writes -----------------------------------------------------------------------------


def accrue(session: Session, program: LoyaltyProgram, member: Member, kind: str, points: int,
           *, reason: str, actor: str, source_ref: str | None = None, store: str | None = None,
           occurred_at: datetime | None = None, now: datetime | None = None) -> LedgerEntry:
    """Append an ``earn`` (points > 0), ``redeem`` (points > 0, taken from the balance) or
    ``adjust`` (signed) entry. The API exposes this as is.

    Raises :class:`DuplicateSourceRef` when the member already earned for ``source_ref`` and
    :class:`InsufficientPoints` when a debit exceeds the balance. Every refusal is raised
    before anything is written, so a caller may keep the refusal in the same transaction
    without a savepoint (the API does).

    The common case reads nothing but the locked member row: expiry is skipped while
    ``next_expiry_at`` is in the future, and the tier comes from the window count cached on
    the member (see :func:`_earned_now`).
    """
    if kind not in ("earn", "redeem", "adjust"):
        raise InvalidEntry("kind must be earn, redeem or adjust", "kind")
    if isinstance(points, bool) or not isinstance(points, int) or points == 0 \
            or abs(points) > MAX_POINTS:
        raise InvalidEntry(f"points must be a whole number between 1 and {MAX_POINTS}", "points")
    if kind in ("earn", "redeem") and points < 0:
        raise InvalidEntry(f"{kind} takes a positive number of points", "points")
    reason = (reason or "").strip()
    if not reason or len(reason) > 200:
        raise InvalidEntry("a reason of at most 200 characters is required", "reason")
    if source_ref is not None and not (0 < len(source_ref) <= 120):
        raise InvalidEntry("source_ref must have 1 to 120 characters", "source_ref")
    if store is not None and len(store) > 64:
        raise InvalidEntry("store must have at most 64 characters", "store")
    now = now or utcnow()
    occurred_at = occurred_at or now
    if occurred_at > now + timedelta(minutes=5):
        raise InvalidEntry("occurred_at is in the future", "occurred_at")
    _lock(session, member)
    _require_active(member)
    once = kind == "earn" and source_ref is not None
    signed = -points if kind == "redeem" else points
    due, next_expiry = _due_lots(session, member, now)
    if once and next_expiry is not None:
        # Expiry may write before the entry: look for the order first. Otherwise the
        # entry's own insert finds it (the member's lock makes either way race-free).
        _refuse_duplicate(session, member, source_ref)
        once = False
    available = member.balance - sum(lot.remaining for lot in due)
    if signed < 0 and available < -signed:
        raise InsufficientPoints(available, -signed)   # before anything is written
    _expire_due(session, program, member, actor="system:expiry", now=now,
                due=(due, next_expiry))
    return _post(session, program, member, kind, signed, reason=reason, actor=actor,
                 source_ref=source_ref, store=store, occurred_at=occurred_at, now=now,
                 once_per_source=once)


def earn(session: Session, program: LoyaltyProgram, member: Member, points: int,
         **kw: Any) -> LedgerEntry:
    return accrue(session, program, member, "earn", points, **kw)


def redeem(session: Session, program: LoyaltyProgram, member: Member, points: int,
           **kw: Any) -> LedgerEntry:
    return accrue(session, program, member, "redeem", points, **kw)


def adjust(session: Session, program: LoyaltyProgram, member: Member, points: int,
           **kw: Any) -> LedgerEntry:
    return accrue(session, program, member, "adjust", points, **kw)


def reverse(session: Session, program: LoyaltyProgram, entry: LedgerEntry, *, reason: str,
            actor: str, now: datetime | None = None) -> LedgerEntry:
    """Append the exact opposite of ``entry`` (a refund, a cancelled reward). Once per entry;
    expiries and reversals themselves cannot be reversed."""
    if entry.kind not in ("earn", "redeem", "adjust"):
        raise NotReversible(f"{entry.kind} entries cannot be reversed", "entry")
    reason = (reason or "").strip()
    if not reason or len(reason) > 200:
        raise InvalidEntry("a reason of at most 200 characters is required", "reason")
    now = now or utcnow()
    member = session.get(Member, entry.member_id)
    assert member is not None
    _lock(session, member)
    _require_active(member)
    if session.scalar(select(exists().where(LedgerEntry.reverses_id == entry.id))):
        raise NotReversible("this entry was already reversed", "entry")
    _expire_due(session, program, member, actor="system:expiry", now=now)
    reversal = _post(session, program, member, "reversal", -entry.points, reason=reason,
                     actor=actor, source_ref=entry.source_ref, store=entry.store, now=now,
                     reverses=entry)
    # Points given back to lots that have expired meanwhile expire now.
    _expire_due(session, program, member, actor="system:expiry", now=now)
    return reversal


# --- internals ---------------------------------------------------------------------------------


def _lock(session: Session, member: Member) -> None:
    """Take the member's row lock and reload it, so the balance read is the committed one.
    A lock this transaction already holds (taken by :func:`lock_by_number`) is not asked
    for again."""
    if not _holds_lock(session, member.id):
        _locked(session, Member.id == member.id)


def _locked(session: Session, condition: Any) -> Member | None:
    """Lock and reload one member, with its customer (whose public id the change feed
    needs), and remember the lock for this transaction."""
    row = session.execute(
        select(Member, Customer.public_id).join(Customer, Customer.id == Member.customer_id)
        .where(condition).with_for_update(of=Member)
        .execution_options(populate_existing=True)).first()
    if row is None:
        return None
    member: Member = row[0]
    root = session.get_transaction()
    held = session.info.get(_LOCKS)
    if held is None or held[0] is not root:
        held = session.info[_LOCKS] = (root, {})
    locks: dict[int, tuple[Any, str]] = held[1]
    locks[member.id] = (_innermost(session), row[1])
    return member


def _innermost(session: Session) -> Any:
    return session.get_nested_transaction() or session.get_transaction()


def _holds_lock(session: Session, member_id: int) -> bool:
    """Whether the row lock was taken in this transaction or a savepoint still open in it
    (a savepoint rolled back releases its locks; one released may have been rolled back
    with its parent, so only the open chain counts)."""
    held = session.info.get(_LOCKS)
    if held is None or held[0] is not session.get_transaction() or member_id not in held[1]:
        return False
    taken_in = held[1][member_id][0]
    transaction = _innermost(session)
    while transaction is not None:
        if transaction is taken_in:
            return True
        transaction = transaction.parent
    return False


def _require_active(member: Member) -> None:
    if member.left_at is not None:
        raise NotAMember("this membership has ended", "member")


def _public_id(session: Session, member: Member) -> str:
    held = session.info.get(_LOCKS)
    if held is not None and held[0] is session.get_transaction() and member.id in held[1]:
        return str(held[1][member.id][1])   # read with the lock
    customer = session.get(Customer, member.customer_id)
    return customer.public_id if customer is not None else ""


def _open_lots(session: Session, member: Member) -> list[Lot]:
    return list(session.scalars(
        select(Lot).where(Lot.member_id == member.id, Lot.remaining > 0)
        .order_by(Lot.earned_at, Lot.entry_id)))


Due = tuple[list[Lot], datetime | None]


def _due_lots(session: Session, member: Member, now: datetime) -> Due:
    """The open lots past their expiry (oldest first) and the next expiry of the others.

    No query while ``next_expiry_at`` is in the future, the common case; the second value
    is then None (nothing to update). Nothing is written here, so a refusal may follow."""
    if member.next_expiry_at is not None and member.next_expiry_at > now:
        return [], None
    due, later = [], NO_EXPIRY
    for lot in _open_lots(session, member):
        if lot.expires_at is not None and lot.expires_at <= now:
            due.append(lot)
        elif lot.expires_at is not None:
            later = min(later, lot.expires_at)
    return due, later


def _lower_next_expiry(member: Member, expires_at: datetime | None) -> None:
    """An open lot expiring at ``expires_at`` appeared (a credit, points given back)."""
    if expires_at is not None and member.next_expiry_at is not None \
            and expires_at < member.next_expiry_at:
        member.next_expiry_at = expires_at


def _take(session: Session, lots: Sequence[Lot], amount: int, entry_id: int) -> int:
    """Consume up to ``amount`` points from ``lots`` in order for the debit ``entry_id``;
    return what could not be."""
    for lot in lots:
        if amount <= 0:
            break
        taken = min(lot.remaining, amount)
        if taken <= 0:
            continue
        lot.remaining -= taken
        amount -= taken
        session.add(LotAllocation(lot_id=lot.entry_id, entry_id=entry_id, points=taken))
    return amount


def _shortfalls(session: Session, member: Member) -> list[tuple[int, int]]:
    """(entry id, points still owed) of debits that could not be covered, oldest first."""
    taken = func.coalesce(func.sum(LotAllocation.points), 0)
    rows = session.execute(
        select(LedgerEntry.id, -LedgerEntry.points - taken)
        .outerjoin(LotAllocation, LotAllocation.entry_id == LedgerEntry.id)
        .where(LedgerEntry.member_id == member.id, LedgerEntry.points < 0)
        .group_by(LedgerEntry.id, LedgerEntry.points)
        .having(-LedgerEntry.points - taken > 0)
        .order_by(LedgerEntry.id))
    return [(entry_id, int(owed)) for entry_id, owed in rows]


def _settle_debt(session: Session, member: Member, debt: int) -> None:
    """Pay a negative balance from the open lots, oldest debt first."""
    lots = _open_lots(session, member)
    for entry_id, owed in _shortfalls(session, member):
        if debt <= 0:
            break
        amount = min(owed, debt)
        debt -= amount - _take(session, lots, amount, entry_id)


def _expire_due(session: Session, program: LoyaltyProgram, member: Member, *, actor: str,
                now: datetime, due: Due | None = None) -> None:
    lots, next_expiry = due if due is not None else _due_lots(session, member, now)
    total = sum(lot.remaining for lot in lots)
    if total:
        _post(session, program, member, "expire", -total, reason="expired", actor=actor,
              now=now, lots=lots)
    if next_expiry is not None:
        member.next_expiry_at = next_expiry


def _refuse_duplicate(session: Session, member: Member, source_ref: str | None) -> None:
    existing = session.scalars(select(LedgerEntry).where(
        LedgerEntry.member_id == member.id, LedgerEntry.kind == "earn",
        LedgerEntry.source_ref == source_ref)).first()
    if existing is not None:
        raise DuplicateSourceRef(existing)


def _append_once(session: Session, values: dict[str, Any]) -> LedgerEntry:
    """Insert an earn unless its order already earned (the partial unique index), in one
    statement; raise :class:`DuplicateSourceRef` (nothing written) when it did."""
    dialect = session.get_bind().dialect.name
    insert_: Any = {"postgresql": pg_insert, "sqlite": sqlite_insert}.get(dialect)
    if insert_ is None:
        _refuse_duplicate(session, session.get_one(Member, values["member_id"]),
                          values["source_ref"])
        entry = LedgerEntry(**values)
        session.add(entry)
        session.flush()
        return entry
    statement = insert_(LedgerEntry).on_conflict_do_nothing(
        index_elements=[LedgerEntry.member_id, LedgerEntry.source_ref],
        # Written out as the index's own predicate: a bound parameter here would stop
        # PostgreSQL from matching the partial index once the statement is prepared.
        index_where=text("kind = 'earn' AND source_ref IS NOT NULL"),
    ).returning(LedgerEntry)
    inserted: LedgerEntry | None = session.scalars(statement, [values]).first()
    if inserted is None:
        _refuse_duplicate(session, session.get_one(Member, values["member_id"]),
                          values["source_ref"])
        raise AssertionError("the earn was refused but no earlier one was found")
    return inserted


def _post(session: Session, program: LoyaltyProgram | None, member: Member, kind: str,
          points: int, *, reason: str, actor: str, now: datetime, source_ref: str | None = None,
          store: str | None = None, occurred_at: datetime | None = None,
          reverses: LedgerEntry | None = None, lots: Sequence[Lot] | None = None,
          once_per_source: bool = False) -> LedgerEntry:
    """Append one entry and bring lots, balance, tier and the change feed along. The member
    row must be locked by the caller. With ``once_per_source`` (an earn whose order was not
    looked up yet), a duplicate order raises :class:`DuplicateSourceRef` before anything is
    written, which needs this entry to be the transaction's first write for the member.
    Without a ``program`` (see :func:`leave`) credits never expire and the tier stays."""
    occurred_at = occurred_at or now
    credit_lot = points > 0 and kind in CREDIT_KINDS
    values = dict(
        member_id=member.id, kind=kind, points=points, reason=reason[:200],
        source_ref=source_ref, store=store, actor=actor[:120], occurred_at=occurred_at,
        recorded_at=now, reverses_id=reverses.id if reverses is not None else None,
        expires_at=program.expires_at(occurred_at) if credit_lot and program is not None
        else None,
    )
    if once_per_source:
        entry = _append_once(session, values)
    else:
        entry = LedgerEntry(**values)
        session.add(entry)
        session.flush()   # the entry's id, for its lot and allocations
    before = member.balance
    if credit_lot:
        session.add(Lot(entry_id=entry.id, member_id=member.id, earned_at=occurred_at,
                        expires_at=entry.expires_at, points=points, remaining=points))
        _lower_next_expiry(member, entry.expires_at)
    elif reverses is not None and points > 0:
        # A debit reversed: its points go back to the lots they came from.
        for allocation in session.scalars(select(LotAllocation).where(
                LotAllocation.entry_id == reverses.id, LotAllocation.points > 0)):
            lot = session.get(Lot, allocation.lot_id)
            assert lot is not None
            lot.remaining += allocation.points
            _lower_next_expiry(member, lot.expires_at)
            session.add(LotAllocation(lot_id=lot.entry_id, entry_id=entry.id,
                                      points=-allocation.points))
    elif points < 0:
        owed = -points
        if reverses is not None:
            own = session.get(Lot, reverses.id)
            owed = _take(session, [own] if own is not None else [], owed, entry.id)
        _take(session, lots if lots is not None else _open_lots(session, member), owed,
              entry.id)
    if before < 0 and points > 0:
        _settle_debt(session, member, min(-before, points))
    member.balance = before + points
    if kind == "earn":
        member.lifetime_earned += points
    elif kind == "redeem":
        member.lifetime_redeemed += -points
    elif kind == "reversal" and reverses is not None:
        if reverses.kind == "earn":
            member.lifetime_earned -= reverses.points
        elif reverses.kind == "redeem":
            member.lifetime_redeemed -= -reverses.points
    public_id = _public_id(session, member)
    previous_tier = member.tier
    if program is not None:
        _refresh_tier(session, program, member, now, entry, public_id)
    changes.emit(session, "loyalty.points_changed", {
        "customer": public_id, "member_number": member.member_number,
        "balance": member.balance, "tier": member.tier, "delta": points, "kind": kind,
        "entry_id": entry.id, "reason": entry.reason, "previous_tier": previous_tier,
        "occurred_at": occurred_at.isoformat(),
    }, member.customer_id)
    return entry


def _refresh_tier(session: Session, program: LoyaltyProgram, member: Member, now: datetime,
                  entry: LedgerEntry, public_id: str) -> None:
    earned = _earned_now(session, program, member, now, entry)
    tier = program.tier_for(earned).key
    if tier == member.tier:
        return
    previous, member.tier, member.tier_changed_at = member.tier, tier, now
    changes.emit(session, "loyalty.tier_changed", tier_change_payload(
        public_id, member.member_number, member.balance, tier, previous, entry.points, earned,
        now), member.customer_id)


def _earned_now(session: Session, program: LoyaltyProgram, member: Member, now: datetime,
                entry: LedgerEntry) -> int:
    """Points earned in the window at ``now``, ``entry`` included: what
    :func:`earned_in_window` would answer, from the member's cached count when it is still
    exact, else from the ledger (and the cache is refilled).

    The cached count stays exact while no earn it counted has left the window and the
    window has not grown (``window_from <= start < window_oldest_at``); each earn is added
    as it is posted. A reversal reads the ledger, and an earn dated in the future (a till's
    clock ahead) leaves the cache unknown, because it will start counting later.
    """
    start = program.window_start(now)
    cached = member.window_earned
    exact = (cached is not None and member.window_from is not None
             and member.window_from <= start
             and (member.window_oldest_at is None or start < member.window_oldest_at))
    if exact and entry.kind != "reversal":
        assert cached is not None
        earned = cached
        at = entry.occurred_at
        if entry.kind == "earn" and start < at <= now and at >= member.enrolled_at:
            earned += entry.points
            member.window_earned = earned
            if member.window_oldest_at is None or at < member.window_oldest_at:
                member.window_oldest_at = at
    else:
        row = session.execute(_window_query(program, [member.id], now)).first()
        earned = int(row[1] or 0) if row is not None else 0
        member.window_earned, member.window_from = earned, start
        member.window_oldest_at = row[2] if row is not None else None
    if entry.kind == "earn" and entry.occurred_at > now:
        member.window_earned = None
    return earned


def tier_change_payload(customer: str, member_number: str, balance: int, tier: str,
                        previous: str, delta: int, earned: int, now: datetime
                        ) -> dict[str, Any]:
    return {"customer": customer, "member_number": member_number, "balance": balance,
            "tier": tier, "previous_tier": previous, "delta": delta,
            "earned_in_window": earned, "occurred_at": now.isoformat()}


def check_member(session: Session, member: Member) -> list[str]:
    """Invariant violations of one member (empty when healthy): used by tests and audits."""
    problems = []
    total = session.scalar(select(func.coalesce(func.sum(LedgerEntry.points), 0))
                           .where(LedgerEntry.member_id == member.id))
    if total != member.balance:
        problems.append(f"balance {member.balance} != ledger sum {total}")
    open_points = session.scalar(select(func.coalesce(func.sum(Lot.remaining), 0))
                                 .where(Lot.member_id == member.id))
    if open_points != max(member.balance, 0):
        problems.append(f"open lots hold {open_points} but the balance is {member.balance}")
    taken = func.coalesce(func.sum(LotAllocation.points), 0)
    bad = session.execute(
        select(Lot.entry_id).outerjoin(LotAllocation, LotAllocation.lot_id == Lot.entry_id)
        .where(Lot.member_id == member.id).group_by(Lot.entry_id, Lot.points, Lot.remaining)
        .having(Lot.remaining != Lot.points - taken)).scalars().all()
    if bad:
        problems.append(f"lots {list(bad)} disagree with their allocations")
    return problems
