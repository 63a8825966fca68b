"""The loyalty programme: members, the append-only points ledger, the lots FIFO consumes, and
the idempotency records of the accrual API.

Ledger entries and lot allocations are facts and are never edited (database triggers refuse
UPDATE and DELETE). Two tables hold state derived from them, kept in the same transaction as
the entry that changes them: ``Member.balance`` (the sum of the member's entries) and
``Lot.remaining`` (a credit's points minus what allocations took from it), which lets the
expiry job find open lots by index instead of re-adding history.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow

ENTRY_KINDS: tuple[str, ...] = ("earn", "redeem", "adjust", "expire", "reversal")


class Member(Base):
    """One membership per customer. The row is never deleted, so a member number is never
    given to anyone else; a member who leaves and comes back keeps their number."""

    __tablename__ = "loyalty_members"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), unique=True)
    member_number: Mapped[str] = mapped_column(String(19), unique=True)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    terms_version: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(32))
    # Always the sum of the member's ledger entries (may be negative after an earn is reversed
    # once spent: that debt is paid by the next credits).
    balance: Mapped[int] = mapped_column(Integer, default=0)
    lifetime_earned: Mapped[int] = mapped_column(Integer, default=0)
    lifetime_redeemed: Mapped[int] = mapped_column(Integer, default=0)
    tier_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Caches kept under the member's row lock so an accrual need not read the ledger; NULL
    # means "not known", and the ledger is read (and the cache refilled) on the next write.
    # No open lot expires before ``next_expiry_at`` (a lower bound: spending lots only
    # makes the true value later).
    next_expiry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Points earned in the tier window as counted at a moment when the window started at
    # ``window_from``; ``window_oldest_at`` is the oldest earn counted. The count is still
    # exact while the window's start stays in [window_from, window_oldest_at).
    window_earned: Mapped[int | None] = mapped_column(Integer)
    window_from: Mapped[datetime | None] = mapped_column(UTCDateTime)
    window_oldest_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class LedgerEntry(Base):
    """One movement of points, as it happened. Never updated, never deleted."""

    __tablename__ = "loyalty_ledger"
    __table_args__ = (
        CheckConstraint(f"kind IN ({', '.join(repr(k) for k in ENTRY_KINDS)})", name="kind"),
        CheckConstraint("points <> 0", name="points_not_zero"),
        Index("ix_loyalty_ledger_member_time", "member_id", "occurred_at"),
        # An order earns once: the API maps a duplicate to 409.
        Index("uq_loyalty_ledger_earn_source", "member_id", "source_ref", unique=True,
              sqlite_where=text("kind = 'earn' AND source_ref IS NOT NULL"),
              postgresql_where=text("kind = 'earn' AND source_ref IS NOT NULL")),
        # An entry is reversed at most once, even by two concurrent refunds.
        Index("uq_loyalty_ledger_reverses", "reverses_id", unique=True,
              sqlite_where=text("reverses_id IS NOT NULL"),
              postgresql_where=text("reverses_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"))
    kind: Mapped[str] = mapped_column(String(16))
    points: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(200))
    source_ref: Mapped[str | None] = mapped_column(String(120))
    store: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(120))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reverses_id: Mapped[int | None] = mapped_column(ForeignKey("loyalty_ledger.id"))


class Lot(Base):
    """What is left of one credit (an earn or a positive adjustment), consumed oldest first.

    ``remaining`` is derived state: ``points`` minus the allocations taken from the lot.
    """

    __tablename__ = "loyalty_lots"
    __table_args__ = (
        CheckConstraint("remaining >= 0 AND remaining <= points", name="remaining_in_range"),
        Index("ix_loyalty_lots_open_member", "member_id", "earned_at",
              sqlite_where=text("remaining > 0"), postgresql_where=text("remaining > 0")),
        Index("ix_loyalty_lots_open_expiry", "expires_at",
              sqlite_where=text("remaining > 0"), postgresql_where=text("remaining > 0")),
    )

    entry_id: Mapped[int] = mapped_column(ForeignKey("loyalty_ledger.id"), primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"))
    earned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    points: Mapped[int] = mapped_column(Integer)
    remaining: Mapped[int] = mapped_column(Integer)


class LotAllocation(Base):
    """Points a debit took from a lot (negative: points a reversal gave back to it), or points
    a credit's lot gave to pay an earlier debit's shortfall. Never updated, never deleted."""

    __tablename__ = "loyalty_lot_allocations"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    lot_id: Mapped[int] = mapped_column(ForeignKey("loyalty_lots.entry_id"), index=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("loyalty_ledger.id"), index=True)
    points: Mapped[int] = mapped_column(Integer)


class TermsAcceptance(Base):
    """Proof that a member accepted a version of the programme terms (a contract, not
    marketing consent). IP and user agent are cleared when the person is erased."""

    __tablename__ = "loyalty_terms_acceptances"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"), index=True)
    terms_version: Mapped[int] = mapped_column(Integer)
    terms_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(120))
    proof_digest: Mapped[str] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(Text)
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IdempotencyRecord(Base):
    """The first answer to an ``Idempotency-Key``: replayed for the same request, refused
    (422) for a different one under the same key."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("actor", "key"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    actor: Mapped[str] = mapped_column(String(120))       # the API key's id
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of method, path and body
    status: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


# The ledger and its allocations are append-only at the database level too.
_REFUSE_FUNCTION = """CREATE OR REPLACE FUNCTION carnet_loyalty_refuse_change() RETURNS trigger
AS $$ BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only'; END; $$
LANGUAGE plpgsql"""


def _table_statements(table: str, dialect: str) -> list[str]:
    if dialect == "postgresql":
        return [_REFUSE_FUNCTION,
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION carnet_loyalty_refuse_change()"]
    if dialect == "sqlite":
        return [f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                for verb in ("UPDATE", "DELETE")]
    return []


_APPEND_ONLY_TABLES: tuple[Any, ...] = (LedgerEntry.__table__, LotAllocation.__table__)


def append_only_statements(dialect: str) -> list[str]:
    """The trigger DDL, for migrations (``create_all`` runs it from ``after_create``)."""
    return [sql for table in _APPEND_ONLY_TABLES for sql in _table_statements(table.name, dialect)]


for _table in _APPEND_ONLY_TABLES:
    for _dialect in ("postgresql", "sqlite"):
        for _sql in _table_statements(_table.name, _dialect):
            event.listen(_table, "after_create", DDL(_sql).execute_if(dialect=_dialect))
