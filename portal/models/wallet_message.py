"""Messages sent by a sending system to the loyalty cards in people's wallets (Google and
Apple), and what became of each recipient.

The API stores the message and answers at once; the worker expands the audience through the
consent decisions (channel ``wallet``) into one recipient row per card, then delivers. The
rows are the per-platform report the API returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow

PLATFORMS: tuple[str, ...] = ("google", "apple")
STATUSES: tuple[str, ...] = ("queued", "sent", "failed", "skipped", "denied")


class WalletMessage(Base):
    __tablename__ = "wallet_messages"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    topic_key: Mapped[str] = mapped_column(String(64))
    header: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    # {"fr": {"header": ..., "body": ...}}
    localized: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "all", or a list of customer public ids
    audience: Mapped[Any] = mapped_column(JSON)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    actor: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set once the audience has been decided and the recipient rows written.
    expanded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WalletMessageRecipient(Base):
    """One card (or one person without a card, platform ``none``) for one message."""

    __tablename__ = "wallet_message_recipients"
    __table_args__ = (
        UniqueConstraint("message_id", "customer_id", "platform"),
        Index("ix_wallet_message_recipients_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("wallet_messages.id"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    platform: Mapped[str] = mapped_column(String(8))          # google, apple, none
    target: Mapped[str | None] = mapped_column(String(200))   # Google object id, Apple serial
    decision: Mapped[str] = mapped_column(String(8))           # send, deny, defer
    reason: Mapped[str] = mapped_column(String(40))            # the decision's reason code
    status: Mapped[str] = mapped_column(String(8))             # see STATUSES
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
