"""The change feed: one row per change to a customer's consent, suppressions, identity or
loyalty, written in the same transaction as the change. It is the outbox webhooks deliver
from, so nothing is lost between a commit and a delivery."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow


class Change(Base):
    __tablename__ = "changes"
    __table_args__ = (Index("ix_changes_txid_id", "txid", "id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    # PostgreSQL transaction id of the writer: readers only pass rows whose transaction is
    # older than every transaction still running, so a cursor never skips a late commit.
    txid: Mapped[int] = mapped_column(BigInteger, default=0)
    type: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
