"""Google Wallet loyalty cards: one object per member, its sync state, and the notifications
Google counts against the per-card quota.

A row exists once the member was handed an "Add to Google Wallet" link: only those members
have a card to keep up to date. ``pending_change_id`` is the outbox mark: set by the feed
consumer in the same transaction that moves its cursor, cleared only after Google accepted
the update, so a crash anywhere in between leaves the card pending rather than stale.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow


class GoogleWalletObject(Base):
    __tablename__ = "google_wallet_objects"
    __table_args__ = (
        Index("ix_google_wallet_objects_due", "pending_change_id", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"), unique=True)
    object_id: Mapped[str] = mapped_column(String(200), unique=True)
    class_id: Mapped[str] = mapped_column(String(200))
    link_issued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When Google first reported the card saved on a phone (``hasUsers``, or the object
    # existing before we inserted it: only the member's save link creates it then).
    saved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when we inserted the object ourselves (it did not exist at Google yet).
    inserted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What Google shows now, as far as we know.
    synced_points: Mapped[int | None] = mapped_column(Integer)
    synced_tier: Mapped[str | None] = mapped_column(String(64))
    synced_state: Mapped[str | None] = mapped_column(String(16))   # ACTIVE or INACTIVE
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Sync state: the oldest change not yet on the card (None: in sync).
    pending_change_id: Mapped[int | None] = mapped_column(BigInteger)
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A worker holding the lease is the only one updating this card; an expired lease
    # (the worker died between claim and send) makes the card due again.
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class GoogleNotification(Base):
    """A notifying update or message sent to one card: Google delivers at most three per
    card in 24 hours and drops the rest silently, so Carnet counts them itself."""

    __tablename__ = "google_wallet_notifications"
    __table_args__ = (Index("ix_google_wallet_notifications_object_time", "object_row_id",
                            "sent_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    object_row_id: Mapped[int] = mapped_column(ForeignKey("google_wallet_objects.id"))
    kind: Mapped[str] = mapped_column(String(16))   # "update" or "message"
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WalletFeedCursor(Base):
    """Where a wallet consumer of the change feed stands (one row per consumer)."""

    __tablename__ = "wallet_feed_cursors"

    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor_txid: Mapped[int] = mapped_column(BigInteger, default=0)
    cursor_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
