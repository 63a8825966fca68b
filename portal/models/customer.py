"""The customer: identity and contact points. Preferences live in consent and contact rules."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, deferred, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    # Opaque id shown to people and API clients; the integer key never leaves the database.
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    email: Mapped[str | None] = mapped_column(String(320), unique=True)
    email_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pending_email: Mapped[str | None] = mapped_column(String(320))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    phone: Mapped[str | None] = mapped_column(String(20), unique=True)
    postal_address: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str | None] = mapped_column(String(8))
    timezone: Mapped[str | None] = mapped_column(String(64))
    # Bumped when the password changes: older sessions and links stop working.
    auth_epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when this record was merged into another; decisions follow the survivor.
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    # A copy of this person's consent states, suppressions and contact rules, written only
    # by the database's triggers (portal.models.decision_facts) and read by decisions: never
    # loaded with the object, never written by the application.
    decision_facts: Mapped[str | None] = deferred(mapped_column(Text))


class ExternalId(Base):
    """An identifier the brand's other systems use for the same person (CRM id, shop id)."""

    __tablename__ = "customer_external_ids"
    __table_args__ = (UniqueConstraint("namespace", "value"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    namespace: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SignInSession(Base):
    """One signed-in browser. Its cookie holds a random key whose SHA-256 is kept here, so a
    copy of the cookie stops working once the row is gone (sign out, sign out everywhere, a new
    password or address, erasure) or too old (idle, absolute lifetime)."""

    __tablename__ = "customer_sessions"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # "password", "link" (a manage or verification link: preferences only) or "confirm" (a
    # single-use link asked for to confirm a sensitive change; fresh for a few minutes).
    method: Mapped[str] = mapped_column(String(16))
    user_agent: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UsedLink(Base):
    """Ids of single-use links already followed, kept until the link would have expired
    anyway. Links, not people: nothing here names a customer."""

    __tablename__ = "used_links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
