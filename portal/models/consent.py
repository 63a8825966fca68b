"""The consent ledger: append-only events, the current state derived from them, suppressions,
contact rules and reported dispatches."""

from __future__ import annotations

from datetime import datetime, time

from sqlalchemy import DDL, ForeignKey, Index, Integer, String, Text, Time, event, text
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow

STATES = ("granted", "withdrawn", "pending")
ANY = "*"


class ConsentEvent(Base):
    """One choice, as made. Never updated, never deleted (enforced by database triggers).

    ``topic_key``/``channel`` may be ``*``: (``*``, channel) is the per-channel switch,
    (``*``, ``*``) is "pause all marketing", (topic, ``*``) a choice for every channel of the
    topic. Personal proof (IP, user agent) lives in :class:`ConsentProof` so that erasure can
    remove it without touching the event; ``proof_digest`` still lets a claimed IP and user agent
    be checked against the event later.
    """

    __tablename__ = "consent_events"
    __table_args__ = (Index("ix_consent_events_customer_time", "customer_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    # An anonymous browser's choice (web push): customer_id is empty, this names the device.
    push_subscription_id: Mapped[int | None] = mapped_column(
        ForeignKey("push_subscriptions.id"), index=True)
    topic_key: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(120))
    wording_version: Mapped[int | None] = mapped_column(Integer)
    wording_hash: Mapped[str | None] = mapped_column(String(64))
    proof_digest: Mapped[str | None] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsentProof(Base):
    """The personal part of an event's proof; cleared (not the event) when a person is erased."""

    __tablename__ = "consent_proofs"

    event_id: Mapped[int] = mapped_column(ForeignKey("consent_events.id"), primary_key=True)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(Text)


class ConsentState(Base):
    """The latest event per (customer, topic, channel); written in the event's transaction."""

    __tablename__ = "consent_states"
    # The channel switches and marketing pauses (topic "*") of everyone, for bulk readers
    # (the audience export): a few rows, where the primary key would mean reading them all.
    __table_args__ = (Index("ix_consent_states_wildcards", "channel", "customer_id",
                            postgresql_where=text("topic_key = '*'"),
                            sqlite_where=text("topic_key = '*'")),)

    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), primary_key=True)
    topic_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[int] = mapped_column(ForeignKey("consent_events.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Suppression(Base):
    """A reason never to use a channel for a person whatever they chose (bounce, complaint,
    SMS STOP). Lifted, not deleted."""

    __tablename__ = "suppressions"
    __table_args__ = (Index("ix_suppressions_customer_channel", "customer_id", "channel"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    address: Mapped[str | None] = mapped_column(String(320))
    source: Mapped[str] = mapped_column(String(32), default="api")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lifted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ContactRule(Base):
    """Contact pressure per channel: a weekly cap and quiet hours in the customer's time zone."""

    __tablename__ = "contact_rules"

    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    max_per_week: Mapped[int | None] = mapped_column(Integer)
    quiet_start: Mapped[time | None] = mapped_column(Time)
    quiet_end: Mapped[time | None] = mapped_column(Time)


class Dispatch(Base):
    """A message a sending system reports as sent; the weekly cap counts these."""

    __tablename__ = "dispatches"
    __table_args__ = (Index("ix_dispatches_customer_channel_time", "customer_id", "channel",
                            "sent_at"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    topic_key: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sender: Mapped[str] = mapped_column(String(120))
    message_id: Mapped[str | None] = mapped_column(String(255))


# The ledger is append-only at the database level too, whatever code runs against it.
_APPEND_ONLY = {
    "postgresql": [
        """CREATE OR REPLACE FUNCTION carnet_refuse_change() RETURNS trigger AS $$
        BEGIN RAISE EXCEPTION 'consent_events is append-only'; END; $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER consent_events_append_only BEFORE UPDATE OR DELETE ON consent_events
        FOR EACH ROW EXECUTE FUNCTION carnet_refuse_change()""",
    ],
    "sqlite": [
        """CREATE TRIGGER consent_events_no_update BEFORE UPDATE ON consent_events
        BEGIN SELECT RAISE(ABORT, 'consent_events is append-only'); END""",
        """CREATE TRIGGER consent_events_no_delete BEFORE DELETE ON consent_events
        BEGIN SELECT RAISE(ABORT, 'consent_events is append-only'); END""",
    ],
}


def append_only_statements(dialect: str) -> list[str]:
    return _APPEND_ONLY.get(dialect, [])


for _dialect, _statements in _APPEND_ONLY.items():
    for _sql in _statements:
        event.listen(
            ConsentEvent.__table__, "after_create", DDL(_sql).execute_if(dialect=_dialect)
        )
