"""The topic catalog as loaded from the TOML file, with every wording version ever shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow

CHANNELS: tuple[str, ...] = ("email", "sms", "voice", "postal", "app_push", "web_push", "wallet")
KINDS: tuple[str, ...] = ("marketing", "service")
# Wording key for the global switches (pause all marketing, nothing on a channel).
SWITCHES_KEY = "*"


class Topic(Base):
    __tablename__ = "topics"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    required: Mapped[bool] = mapped_column(Boolean, default=False)
    position: Mapped[int] = mapped_column(Integer, default=0)
    channels: Mapped[list[str]] = mapped_column(JSON)
    defaults: Mapped[dict[str, bool]] = mapped_column(JSON)
    names: Mapped[dict[str, str]] = mapped_column(JSON)
    descriptions: Mapped[dict[str, str]] = mapped_column(JSON)
    wording: Mapped[dict[str, str]] = mapped_column(JSON)
    wording_version: Mapped[int] = mapped_column(Integer, default=1)
    wording_hash: Mapped[str] = mapped_column(String(64))
    # A topic dropped from the catalog stays for history but is no longer offered.
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class TopicWording(Base):
    """Every consent wording version, kept forever: proof of what the person was shown."""

    __tablename__ = "topic_wordings"
    __table_args__ = (UniqueConstraint("topic_key", "version"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    topic_key: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    texts: Mapped[dict[str, Any]] = mapped_column(JSON)
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
