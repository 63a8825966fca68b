"""Nightly loyalty jobs, set-based and in batches of members: points expiry and tiers.

Each batch locks its members (in id order, so two runs cannot deadlock; accruals lock one
member at a time), then works with a handful of statements whatever the number of lots:
one expire entry per member with its allocations, lots closed, balances moved, changes
appended. Running a job twice changes nothing the second time: expiry only touches lots
still open and past due, tiers only members whose tier differs.

The ``*_batches`` generators yield after each batch so the caller can commit between batches
(the CLI does, keeping locks short); :func:`expire_points` and :func:`recompute_tiers` run
everything inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, literal, select, update
from sqlalchemy.orm import Session

from portal.core.db import UTCDateTime, utcnow
from portal.loyalty.ledger import earned_in_window, tier_change_payload
from portal.loyalty.models import LedgerEntry, Lot, LotAllocation, Member
from portal.loyalty.program import LoyaltyProgram
from portal.models.customer import Customer
from portal.outbox.changes import current_txid
from portal.outbox.models import Change

BATCH = 1000
ACTOR = "system:expiry"


@dataclass
class ExpiryReport:
    members: int = 0
    lots: int = 0
    points: int = 0

    def add(self, other: ExpiryReport) -> None:
        self.members += other.members
        self.lots += other.lots
        self.points += other.points


@dataclass
class TierReport:
    members: int = 0
    changed: dict[str, int] = field(default_factory=dict)   # "silver->bronze": count

    def add(self, other: TierReport) -> None:
        self.members += other.members
        for key, count in other.changed.items():
            self.changed[key] = self.changed.get(key, 0) + count


def _emit_many(session: Session, type_: str, rows: list[tuple[int, dict[str, Any]]],
               now: datetime) -> None:
    """Append many changes at once: the same rows :func:`changes.emit` writes, with one
    transaction-id lookup per batch instead of one per change."""
    if rows:
        txid = current_txid(session)
        session.execute(insert(Change), [
            {"txid": txid, "type": type_, "customer_id": customer_id, "data": data,
             "occurred_at": now} for customer_id, data in rows])


def _locked_members(session: Session, ids: Sequence[int]) -> list[Any]:
    return list(session.execute(
        select(Member.id, Member.customer_id, Member.member_number, Member.balance,
               Member.tier, Customer.public_id)
        .join(Customer, Customer.id == Member.customer_id)
        .where(Member.id.in_(ids)).order_by(Member.id).with_for_update(of=Member)))


def expire_batches(session: Session, now: datetime | None = None, *, batch_size: int = BATCH,
                   member_ids: Sequence[int] | None = None) -> Iterator[ExpiryReport]:
    """Expire every open lot whose expiry is ``now`` or earlier, oldest lots first."""
    now = now or utcnow()
    due = select(Lot.member_id).where(Lot.remaining > 0, Lot.expires_at <= now).distinct()
    if member_ids is not None:
        due = due.where(Lot.member_id.in_(member_ids))
    ids = sorted(session.scalars(due))
    for start in range(0, len(ids), batch_size):
        yield _expire_batch(session, ids[start:start + batch_size], now)


def _expire_batch(session: Session, ids: Sequence[int], now: datetime) -> ExpiryReport:
    """Lots never travel to Python: the expire entries, their allocations, the closed lots
    and the new balances are each one INSERT ... SELECT or UPDATE over the batch."""
    members = {row.id: row for row in _locked_members(session, ids)}
    lots, entries, member_table = (cast(Table, m.__table__) for m in (Lot, LedgerEntry, Member))
    due = and_(lots.c.member_id.in_(ids), lots.c.remaining > 0, lots.c.expires_at <= now)
    stamp = literal(now, UTCDateTime())
    created = session.execute(
        insert(entries).from_select(
            ["member_id", "kind", "points", "reason", "actor", "occurred_at", "recorded_at"],
            select(lots.c.member_id, literal("expire"), -func.sum(lots.c.remaining),
                   literal("expired"), literal(ACTOR), stamp, stamp)
            .where(due).group_by(lots.c.member_id))
        .returning(entries.c.id, entries.c.member_id, entries.c.points)).all()
    if not created:
        return ExpiryReport()
    entry_ids = [row.id for row in created]
    allocated = session.execute(insert(cast(Table, LotAllocation.__table__)).from_select(
        ["lot_id", "entry_id", "points"],
        select(lots.c.entry_id, entries.c.id, lots.c.remaining)
        .join(entries, and_(entries.c.member_id == lots.c.member_id,
                            entries.c.id.in_(entry_ids)))
        .where(due)), execution_options={"preserve_rowcount": True})
    session.execute(update(lots).where(due).values(remaining=0))
    session.execute(
        update(member_table).where(member_table.c.id.in_([row.member_id for row in created]))
        .values(balance=member_table.c.balance + select(entries.c.points).where(
            entries.c.id.in_(entry_ids), entries.c.member_id == member_table.c.id
        ).scalar_subquery(), updated_at=now))
    _emit_many(session, "loyalty.points_changed", [
        (members[row.member_id].customer_id, {
            "customer": members[row.member_id].public_id,
            "member_number": members[row.member_id].member_number,
            "balance": members[row.member_id].balance + row.points,
            "tier": members[row.member_id].tier, "delta": row.points, "kind": "expire",
            "entry_id": row.id, "reason": "expired",
            "previous_tier": members[row.member_id].tier, "occurred_at": now.isoformat()})
        for row in created], now)
    return ExpiryReport(len(created), int(getattr(allocated, "rowcount", 0) or 0),
                        -sum(row.points for row in created))


def expire_points(session: Session, now: datetime | None = None, *, batch_size: int = BATCH,
                  member_ids: Sequence[int] | None = None) -> ExpiryReport:
    """Expire everything due, in the caller's transaction. Safe to run again."""
    report = ExpiryReport()
    for batch in expire_batches(session, now, batch_size=batch_size, member_ids=member_ids):
        report.add(batch)
    return report


def tier_batches(session: Session, program: LoyaltyProgram, now: datetime | None = None, *,
                 batch_size: int = BATCH) -> Iterator[TierReport]:
    """Recompute every active member's tier from the points earned in the window: tiers go
    down as well as up when old earns leave the window."""
    now = now or utcnow()
    last = 0
    while True:
        ids = list(session.scalars(
            select(Member.id).where(Member.left_at.is_(None), Member.id > last)
            .order_by(Member.id).limit(batch_size)))
        if not ids:
            return
        last = ids[-1]
        yield _tier_batch(session, program, ids, now)


def _tier_batch(session: Session, program: LoyaltyProgram, ids: Sequence[int],
                now: datetime) -> TierReport:
    members = _locked_members(session, ids)
    earned = earned_in_window(session, program, ids, now)
    report = TierReport(members=len(members))
    moved = []
    for row in members:
        tier = program.tier_for(earned[row.id]).key
        if tier != row.tier:
            moved.append((row, tier))
            key = f"{row.tier}->{tier}"
            report.changed[key] = report.changed.get(key, 0) + 1
    if moved:
        session.execute(update(Member).execution_options(synchronize_session=False), [
            {"id": row.id, "tier": tier, "tier_changed_at": now, "updated_at": now}
            for row, tier in moved])
        _emit_many(session, "loyalty.tier_changed", [
            (row.customer_id, tier_change_payload(row.public_id, row.member_number, row.balance,
                                                  tier, row.tier, 0, earned[row.id], now))
            for row, tier in moved], now)
    return report


def recompute_tiers(session: Session, program: LoyaltyProgram, now: datetime | None = None, *,
                    batch_size: int = BATCH) -> TierReport:
    report = TierReport()
    for batch in tier_batches(session, program, now, batch_size=batch_size):
        report.add(batch)
    return report
