"""Web push: browser subscriptions, the topic choices of anonymous devices, messages sent by
sending systems and one delivery per (message, subscription)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from portal.core.db import Base, BigID, UTCDateTime, utcnow

DELIVERY_STATUSES = ("queued", "sent", "failed", "expired", "skipped")


class PushSubscription(Base):
    """One browser's ``PushSubscription``. ``customer_id`` is empty for a visitor who is not
    signed in; ``device_hash`` (SHA-256 of the device cookie) lets their choices join their
    account when they sign in. Never deleted while events point at it: expired instead."""

    __tablename__ = "push_subscriptions"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    endpoint: Mapped[str] = mapped_column(String(2048), unique=True)
    # SHA-256 of the endpoint: what the service worker sends back in beacons.
    endpoint_hash: Mapped[str] = mapped_column(String(64), unique=True)
    p256dh: Mapped[str] = mapped_column(String(128))
    auth: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    device_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    user_agent: Mapped[str | None] = mapped_column(String(512))
    locale: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when the push service answered 404/410, or the person left from this browser.
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_reason: Mapped[str | None] = mapped_column(String(32))


class PushTopicChoice(Base):
    """The current choice of an anonymous device per topic: the device's ``ConsentState``.

    Written in the same transaction as the device's consent event (``consent_events`` with
    ``customer_id`` empty and ``push_subscription_id`` set)."""

    __tablename__ = "push_topic_choices"

    subscription_id: Mapped[int] = mapped_column(ForeignKey("push_subscriptions.id"),
                                                 primary_key=True)
    topic_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[int] = mapped_column(ForeignKey("consent_events.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PushMessage(Base):
    """A notification a sending system asked for. ``audience`` is ``"all"`` or
    ``{"customers": [public ids]}``; ``fanout_cursor`` is the last subscription id expanded,
    so an interrupted fan-out resumes where it stopped."""

    __tablename__ = "push_messages"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    topic_key: Mapped[str] = mapped_column(String(64))
    audience: Mapped[Any] = mapped_column(JSON)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    url: Mapped[str | None] = mapped_column(String(2000))
    icon: Mapped[str | None] = mapped_column(String(2000))
    # {"fr": {"title": ..., "body": ..., "url": ..., "icon": ...}}: chosen per recipient.
    localized: Mapped[dict[str, dict[str, str]]] = mapped_column(JSON, default=dict)
    ttl: Mapped[int] = mapped_column(Integer)
    urgency: Mapped[str] = mapped_column(String(16), default="normal")
    collapse_topic: Mapped[str | None] = mapped_column(String(32))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    fanout_cursor: Mapped[int] = mapped_column(Integer, default=0)
    fanned_out_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Customers named in the audience who have no active subscription.
    unreachable: Mapped[int] = mapped_column(Integer, default=0)


class PushDelivery(Base):
    """One message to one subscription. ``leased_until`` marks a worker's claim: a worker that
    dies mid-send leaves the row queued, and it is claimed again once the lease runs out."""

    __tablename__ = "push_deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "subscription_id"),
        Index("ix_push_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("push_messages.id"))
    subscription_id: Mapped[int] = mapped_column(ForeignKey("push_subscriptions.id"),
                                                 index=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(300))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    displayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    clicked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
