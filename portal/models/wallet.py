"""Wallet cards: the Apple pass of each member, the devices that hold it, the pushes still to
send to them, and the news shown on the card.

``ApplePass.update_txid``/``update_tag`` order pass updates for the PassKit web service the
way the change feed orders changes (writer's transaction id, then a counter), so a device
asking "what changed since my last tag" never misses a pass whose transaction committed late.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow


class ApplePass(Base):
    """One Apple Wallet card per member, issued once and then only updated.

    ``serial_number`` and ``authentication_token`` are written into every issued copy of the
    card and must never change. The token is kept as is (not hashed) because each re-issued
    copy must carry the same one; it only ever grants access to this card.
    """

    __tablename__ = "wallet_apple_passes"
    __table_args__ = (
        Index("ix_wallet_apple_passes_update", "update_txid", "update_tag"),
        Index("ix_wallet_apple_passes_tag", "update_tag"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"), unique=True)
    serial_number: Mapped[str] = mapped_column(String(64), unique=True)
    authentication_token: Mapped[str] = mapped_column(String(64))
    # Writer's PostgreSQL transaction id (0 on SQLite) and a counter: the update order.
    update_txid: Mapped[int] = mapped_column(BigInteger, default=0)
    update_tag: Mapped[int] = mapped_column(BigInteger, default=0)
    # Last-Modified of the card; moves forward by at least a second per update.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AppleDeviceRegistration(Base):
    """A device that holds the card and asked to be told when it changes."""

    __tablename__ = "wallet_apple_registrations"
    __table_args__ = (UniqueConstraint("device_library_identifier", "pass_id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    device_library_identifier: Mapped[str] = mapped_column(String(128))
    push_token: Mapped[str] = mapped_column(String(200))
    pass_id: Mapped[int] = mapped_column(
        ForeignKey("wallet_apple_passes.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApplePush(Base):
    """An update push still owed to one registration (at most one row per registration).

    A row is deleted only once APNs accepted the push for the tag it carries; a newer update
    re-arms the same row, so pushes coalesce and none is lost to a crash mid-send.
    """

    __tablename__ = "wallet_apple_pushes"
    __table_args__ = (Index("ix_wallet_apple_pushes_due", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    registration_id: Mapped[int] = mapped_column(
        ForeignKey("wallet_apple_registrations.id", ondelete="CASCADE"), unique=True
    )
    tag: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WalletNews(Base):
    """News for one member's wallet card; the newest row is shown on the back of the card.

    ``locales`` holds the other languages: ``{"fr": {"header": ..., "body": ...}}``;
    ``header``/``body`` are the English text.
    """

    __tablename__ = "wallet_news"
    __table_args__ = (Index("ix_wallet_news_member_latest", "member_id", "created_at", "id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    member_id: Mapped[int] = mapped_column(ForeignKey("loyalty_members.id"))
    header: Mapped[str] = mapped_column(String(120))
    body: Mapped[str] = mapped_column(Text)
    locales: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message_ref: Mapped[str | None] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
