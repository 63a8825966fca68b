"""Rate-limit counters shared by every process through the database (when no Redis is
configured outside development). Keys are digests: no address or IP is stored here."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, UTCDateTime


class RateLimitCounter(Base):
    """Attempts counted for one key in one fixed window (``bucket``: its start // its length);
    the previous window's count weighs in too, so the limit slides (see ``portal.core.ratelimit``).
    Rows are deleted once they can no longer count (``expires_at``)."""

    __tablename__ = "rate_limit_counters"
    __table_args__ = (Index("ix_rate_limit_counters_expires_at", "expires_at"),)

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hits: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
