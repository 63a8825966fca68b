"""Messages on loyalty cards in Google Wallet and Apple Wallet, decided and delivered per card.

A message is accepted as is (:func:`create_message`) and does nothing else in the request.
The worker then expands its audience (:func:`expand`): every person is asked of the consent
precedence on channel ``wallet`` (:func:`decisions.decide_many`), and each of their saved
cards gets a recipient row: ``queued`` when the answer is send (or defer, queued for the
moment it names), ``denied`` with the reason otherwise. Delivery (:func:`deliver_due`) takes
queued rows: a Google card gets ``addMessage`` (``TEXT_AND_NOTIFY`` while the card's
notification quota allows, else ``TEXT``), an Apple card gets a :class:`WalletNews` row and an
update push through the Apple service.

A person is reachable on ``wallet`` when they have a Google card saved on a phone or an Apple
card with a registered device; :func:`wallet_contacts` is the decision module's resolver.
"""

from __future__ import annotations

import importlib
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from passes import google as gpass
from portal.core.db import utcnow
from portal.delivery.google_wallet import (
    GoogleWalletClient,
    GoogleWalletConflictError,
    GoogleWalletError,
)
from portal.loyalty.models import Member
from portal.models.consent import Dispatch
from portal.models.customer import Customer
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject
from portal.models.wallet import AppleDeviceRegistration, ApplePass, WalletNews
from portal.models.wallet_message import (
    PLATFORMS,
    WalletMessage,
    WalletMessageRecipient,
)
from portal.services import decisions, identity
from portal.services.catalog import Catalog
from portal.services.privacy import PrivacyHooks
from portal.services.wallet_google import Backoff, may_notify, saved_cards

log = logging.getLogger("carnet.wallet.messages")

CHANNEL = "wallet"
SENDER = "carnet:wallet-messages"
BATCH = 1000


class WalletMessageError(ValueError):
    """A message that cannot be accepted; ``code`` and ``field`` feed the API's 422."""

    def __init__(self, code: str, message: str, field: str) -> None:
        super().__init__(message)
        self.code, self.field = code, field


# --- who is reachable on the wallet channel ----------------------------------------------------


def wallet_contacts(session: Session, customers: Sequence[Customer]) -> dict[int, dict[str, Any]]:
    """customer id -> ``{"google_object_id": ..., "apple_serial": ...}`` (the keys they have):
    a Google card saved on a phone, an Apple card with at least one registered device."""
    ids = [c.id for c in customers]
    contacts: dict[int, dict[str, Any]] = {}
    for cid, object_id in saved_cards(session, ids).items():
        contacts.setdefault(cid, {})["google_object_id"] = object_id
    for cid, serial in apple_cards(session, ids).items():
        contacts.setdefault(cid, {})["apple_serial"] = serial
    return contacts


def apple_cards(session: Session, customer_ids: list[int]) -> dict[int, str]:
    if not customer_ids:
        return {}
    registered = exists().where(AppleDeviceRegistration.pass_id == ApplePass.id)
    return dict(session.execute(
        select(Member.customer_id, ApplePass.serial_number)
        .join(ApplePass, ApplePass.member_id == Member.id)
        .where(Member.customer_id.in_(customer_ids), Member.left_at.is_(None), registered)
    ).all())


def install() -> None:
    """Register the ``wallet`` contact resolver with the decision module (idempotent)."""
    decisions.CONTACT_RESOLVERS[CHANNEL] = wallet_contacts


# --- accepting a message ------------------------------------------------------------------------


def create_message(session: Session, catalog: Catalog, *, topic: str, header: str, body: str,
                   localized: dict[str, dict[str, str]], audience: Any, actor: str,
                   api_key_id: int | None = None, now: datetime | None = None
                   ) -> WalletMessage:
    """Store a message for the worker. ``audience`` is ``"all"`` (everyone with a wallet
    card) or ``{"customers": [public ids]}``; unknown ids are refused, naming the first."""
    texts = [("header", header), ("body", body)] + [
        (f"localized.{language}.{name}", text[name])
        for language, text in localized.items() for name in ("header", "body")]
    for field_name, value in texts:
        if not value.strip():
            raise WalletMessageError("blank", "must not be blank", field_name)
    info = catalog.get(topic)
    if info is None:
        raise WalletMessageError("unknown_topic", f"no topic '{topic}'", "topic")
    if CHANNEL not in info.channels:
        raise WalletMessageError("channel_not_offered",
                                 f"topic '{topic}' is not offered on the wallet channel",
                                 "topic")
    if audience == "all":
        stored: Any = "all"
    else:
        public_ids: list[str] = list(audience["customers"])
        found = identity.resolve_many(session, [{"id": pid} for pid in public_ids])
        for index, customer in enumerate(found):
            if customer is None:
                raise WalletMessageError("unknown_customer", "no such customer",
                                         f"audience.customers[{index}]")
        stored = {"customers": sorted({c.id for c in found if c is not None})}
    message = WalletMessage(
        public_id="wmsg_" + secrets.token_urlsafe(12), topic_key=topic, header=header,
        body=body, localized=dict(localized), audience=stored, api_key_id=api_key_id,
        actor=actor[:120], created_at=now or utcnow())
    session.add(message)
    session.flush()
    return message


def find(session: Session, public_id: str) -> WalletMessage | None:
    return session.scalars(select(WalletMessage)
                           .where(WalletMessage.public_id == public_id)).first()


# --- expanding the audience ---------------------------------------------------------------------


def _audience(session: Session, message: WalletMessage) -> list[Customer]:
    if message.audience == "all":
        reachable = or_(
            select(GoogleWalletObject.id).join(Member, Member.id == GoogleWalletObject.member_id)
            .where(Member.customer_id == Customer.id, Member.left_at.is_(None),
                   GoogleWalletObject.saved_at.is_not(None)).exists(),
            select(ApplePass.id).join(Member, Member.id == ApplePass.member_id)
            .join(AppleDeviceRegistration, AppleDeviceRegistration.pass_id == ApplePass.id)
            .where(Member.customer_id == Customer.id, Member.left_at.is_(None)).exists(),
        )
        return list(session.scalars(select(Customer).where(
            Customer.erased_at.is_(None), Customer.merged_into_id.is_(None), reachable)
            .order_by(Customer.id)))
    ids = message.audience["customers"]
    return list(session.scalars(select(Customer).where(Customer.id.in_(ids))
                                .order_by(Customer.id)))


def apple_delivery() -> Callable[..., Any] | None:
    """The Apple service's ``notify_pass_changed``, when that side is installed."""
    try:
        module = importlib.import_module("portal.services.wallet_apple")
    except ImportError:
        return None
    notify: Callable[..., Any] | None = getattr(module, "notify_pass_changed", None)
    return notify


def expand(session: Session, catalog: Catalog, message: WalletMessage, now: datetime, *,
           default_timezone: str = "UTC") -> int:
    """Decide every person of the audience and write one recipient row per card (or one
    ``none`` row for a person without a card). Returns the rows written."""
    apple_ready = apple_delivery() is not None
    customers = _audience(session, message)
    written = 0
    for start in range(0, len(customers), BATCH):
        chunk = customers[start:start + BATCH]
        answers = decisions.decide_many(
            session, catalog, [(c, message.topic_key, CHANNEL) for c in chunk], now,
            default_timezone=default_timezone)
        contacts = wallet_contacts(session, chunk)
        for customer, decision in zip(chunk, answers, strict=True):
            contact = contacts.get(customer.id, {})
            cards = [(p, contact.get(key)) for p, key in
                     (("google", "google_object_id"), ("apple", "apple_serial"))
                     if contact.get(key)]
            if not cards:
                cards = [("none", None)]
            for platform, target in cards:
                row = WalletMessageRecipient(
                    message_id=message.id, customer_id=customer.id, platform=platform,
                    target=target, decision=decision.decision, reason=decision.reason,
                    status="queued", attempts=0)
                if decision.decision == "deny" or platform == "none":
                    row.status = "denied"
                elif platform == "apple" and not apple_ready:
                    row.status, row.reason = "skipped", "apple_unavailable"
                elif decision.decision == "defer":
                    row.next_attempt_at = decision.next_allowed_at
                session.add(row)
                written += 1
    message.expanded_at = now
    session.flush()
    return written


def expand_pending(session: Session, catalog: Catalog, now: datetime, *,
                   default_timezone: str = "UTC", limit: int = 10) -> int:
    """Expand messages not expanded yet (locked, so two workers never expand one twice)."""
    messages = list(session.scalars(
        select(WalletMessage).where(WalletMessage.expanded_at.is_(None))
        .order_by(WalletMessage.id).limit(limit).with_for_update(skip_locked=True)))
    for message in messages:
        try:
            with session.begin_nested():
                expand(session, catalog, message, now, default_timezone=default_timezone)
        except Exception as exc:  # one message that cannot be expanded never stops the others
            log.error("wallet message %s: expansion raised %s; given up", message.id,
                      type(exc).__name__)
            message.expanded_at = now  # no recipients: the report shows nobody reached
    return len(messages)


# --- delivery -----------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    expanded: int = 0
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        return (f"{self.expanded} messages expanded; {self.sent} sent, {self.retrying} to "
                f"retry, {self.failed} failed, {self.skipped} skipped")


def claim_due(session: Session, now: datetime, backoff: Backoff, limit: int = 200
              ) -> list[int]:
    ids = list(session.scalars(
        select(WalletMessageRecipient.id).where(
            WalletMessageRecipient.status == "queued",
            or_(WalletMessageRecipient.next_attempt_at.is_(None),
                WalletMessageRecipient.next_attempt_at <= now),
            or_(WalletMessageRecipient.leased_until.is_(None),
                WalletMessageRecipient.leased_until < now),
        ).order_by(WalletMessageRecipient.id).limit(limit)
        .with_for_update(skip_locked=True)))
    if ids:
        session.execute(update(WalletMessageRecipient)
                        .where(WalletMessageRecipient.id.in_(ids))
                        .values(leased_until=now + timedelta(seconds=backoff.lease_seconds)))
    return ids


def _translations(message: WalletMessage) -> dict[str, tuple[str, str]]:
    texts = {"en": (message.header, message.body)}
    for language, text in (message.localized or {}).items():
        texts[language] = (text["header"], text["body"])
    return texts


def _sent(session: Session, row: WalletMessageRecipient, message: WalletMessage,
          now: datetime) -> None:
    row.status, row.sent_at, row.error = "sent", now, None
    row.leased_until = row.next_attempt_at = None
    already = session.scalar(select(exists().where(
        Dispatch.customer_id == row.customer_id, Dispatch.message_id == message.public_id)))
    if not already:   # one dispatch per person, whatever the number of cards
        session.add(Dispatch(customer_id=row.customer_id, topic_key=message.topic_key,
                             channel=CHANNEL, sent_at=now, sender=SENDER,
                             message_id=message.public_id))


def _deliver_google(make_session: Callable[[], Session], client: GoogleWalletClient | None,
                    row_id: int, now: datetime, backoff: Backoff, report: DeliveryReport
                    ) -> None:
    session = make_session()
    try:
        with session.begin():
            row = session.get(WalletMessageRecipient, row_id)
            assert row is not None
            if client is None:
                row.status, row.reason, row.leased_until = "skipped", "google_unavailable", None
                report.skipped += 1
                return
            message = session.get(WalletMessage, row.message_id)
            card = session.scalars(select(GoogleWalletObject).where(
                GoogleWalletObject.object_id == row.target)).first()
            customer = session.get(Customer, row.customer_id)
            assert message is not None and card is not None and customer is not None
            notify = may_notify(session, card, now)
            locale = customer.locale if customer.locale in ("en", "fr") else "en"
            object_id, card_id = card.object_id, card.id
            header, text = message.header, message.body
            public_id, translations = message.public_id, _translations(message)
        error: Exception | None = None
        try:
            client.add_message(object_id, gpass.build_message(
                header, text, public_id, translations, default_language=locale,
                notify=notify))
        except GoogleWalletConflictError:
            pass   # sent before a crash kept us from recording it: Google has it
        except (GoogleWalletError, gpass.GoogleWalletValidationError) as exc:
            error = exc
        with session.begin():
            row = session.get(WalletMessageRecipient, row_id)
            assert row is not None
            message = session.get(WalletMessage, row.message_id)
            assert message is not None
            row.attempts += 1
            if error is None:
                _sent(session, row, message, now)
                if notify:
                    session.add(GoogleNotification(object_row_id=card_id, kind="message",
                                                   sent_at=now))
                report.sent += 1
            elif isinstance(error, GoogleWalletError) and error.retryable:
                row.error, row.leased_until = str(error)[:1000], None
                row.next_attempt_at = now + backoff.delay(row.attempts, error.retry_after)
                report.retrying += 1
            else:
                row.status, row.error, row.leased_until = "failed", str(error)[:1000], None
                report.failed += 1
    finally:
        session.close()


def _deliver_apple(make_session: Callable[[], Session], row_id: int, now: datetime,
                   report: DeliveryReport) -> None:
    """News on the card and an update push, in one transaction: nothing to retry here (the
    Apple side delivers its pushes from its own queue)."""
    notify = apple_delivery()
    session = make_session()
    try:
        with session.begin():
            row = session.get(WalletMessageRecipient, row_id)
            assert row is not None
            if notify is None:
                row.status, row.reason, row.leased_until = "skipped", "apple_unavailable", None
                report.skipped += 1
                return
            message = session.get(WalletMessage, row.message_id)
            member = session.scalars(select(Member).where(
                Member.customer_id == row.customer_id)).first()
            assert message is not None and member is not None
            session.add(WalletNews(member_id=member.id, header=message.header,
                                   body=message.body, locales=dict(message.localized or {}),
                                   message_ref=message.public_id, created_at=now))
            session.flush()
            notify(session, member, "message")
            row.attempts += 1
            _sent(session, row, message, now)
            report.sent += 1
    finally:
        session.close()


def deliver_due(make_session: Callable[[], Session], catalog: Catalog,
                client: GoogleWalletClient | None, *, now: datetime | None = None,
                backoff: Backoff | None = None, default_timezone: str = "UTC",
                limit: int = 200) -> DeliveryReport:
    """Expand new messages, then deliver due recipients. Manages its own transactions, like
    the card sync: no transaction is held across a call to Google."""
    now = now or utcnow()
    backoff = backoff or Backoff()
    report = DeliveryReport()
    session = make_session()
    try:
        with session.begin():
            report.expanded = expand_pending(session, catalog, now,
                                             default_timezone=default_timezone)
        with session.begin():
            claimed = [(rid, platform) for rid, platform in session.execute(
                select(WalletMessageRecipient.id, WalletMessageRecipient.platform)
                .where(WalletMessageRecipient.id.in_(claim_due(session, now, backoff, limit))))]
    finally:
        session.close()
    for row_id, platform in sorted(claimed):
        try:
            if platform == "google":
                _deliver_google(make_session, client, row_id, now, backoff, report)
            else:
                _deliver_apple(make_session, row_id, now, report)
        except Exception as exc:  # one recipient's failure never stops the others
            _record_crash(make_session, row_id, exc, now, backoff, report)
    return report


def _record_crash(make_session: Callable[[], Session], row_id: int, exc: Exception,
                  now: datetime, backoff: Backoff, report: DeliveryReport) -> None:
    """An unexpected exception while delivering to one recipient (a card gone since the
    expansion, say): retried with backoff like a transient error, logged by type only."""
    log.error("wallet message recipient %s: delivery raised %s; retried later", row_id,
              type(exc).__name__)
    session = make_session()
    try:
        with session.begin():
            row = session.get(WalletMessageRecipient, row_id)
            if row is None:
                return
            row.attempts += 1
            row.error = f"unexpected error ({type(exc).__name__})"
            row.leased_until = None
            row.next_attempt_at = now + backoff.delay(row.attempts, None)
            report.retrying += 1
    finally:
        session.close()


# --- the report ---------------------------------------------------------------------------------


def summary(session: Session, message: WalletMessage) -> dict[str, Any]:
    """What became of the message, per platform (``none``: people without a card)."""
    rows = session.execute(
        select(WalletMessageRecipient.platform, WalletMessageRecipient.status,
               WalletMessageRecipient.reason, WalletMessageRecipient.customer_id)
        .where(WalletMessageRecipient.message_id == message.id)).all()
    platforms: dict[str, dict[str, Any]] = {
        p: {"queued": 0, "sent": 0, "failed": 0, "skipped": {}, "denied": {}}
        for p in (*PLATFORMS, "none")}
    by_reason: dict[tuple[str, str], Counter[str]] = {}
    for platform, status, reason, _ in rows:
        counts = platforms[platform]
        if status in ("skipped", "denied"):
            by_reason.setdefault((platform, status), Counter())[reason] += 1
        else:
            counts[status] += 1
    for (platform, status), counter in by_reason.items():
        platforms[platform][status] = dict(sorted(counter.items()))
    queued = any(status == "queued" for _, status, _, _ in rows)
    state = "accepted" if message.expanded_at is None else ("delivering" if queued else "done")
    return {
        "id": message.public_id, "topic": message.topic_key, "status": state,
        "created_at": message.created_at.isoformat(),
        "recipients": len({cid for _, _, _, cid in rows}),
        "platforms": platforms,
    }


# --- privacy ------------------------------------------------------------------------------------

EXPORT_NAME = "wallet_messages"


def export_recipients(session: Session, customer: Customer) -> list[dict[str, Any]]:
    """The wallet messages meant for the customer, per card, and what became of them."""
    rows = session.execute(
        select(WalletMessageRecipient, WalletMessage)
        .join(WalletMessage, WalletMessage.id == WalletMessageRecipient.message_id)
        .where(WalletMessageRecipient.customer_id == customer.id)
        .order_by(WalletMessageRecipient.id))
    return [
        {"message": message.public_id, "topic": message.topic_key, "header": message.header,
         "body": message.body, "platform": row.platform, "decision": row.decision,
         "reason": row.reason, "status": row.status,
         "sent_at": row.sent_at.isoformat() if row.sent_at else None}
        for row, message in rows
    ]


def erase_recipients(session: Session, customer: Customer) -> None:
    """Queued rows are delivered without a second decision: an erased person's are skipped
    now. The rows stay, pseudonymous, in the message's counts; their errors go."""
    session.execute(
        update(WalletMessageRecipient)
        .where(WalletMessageRecipient.customer_id == customer.id,
               WalletMessageRecipient.status == "queued")
        .values(status="skipped", reason="erased", leased_until=None, next_attempt_at=None)
        .execution_options(synchronize_session=False))
    session.execute(
        update(WalletMessageRecipient).where(WalletMessageRecipient.customer_id == customer.id)
        .values(error=None).execution_options(synchronize_session=False))


def register_privacy(hooks: PrivacyHooks) -> None:
    hooks.add_exporter(EXPORT_NAME, export_recipients)
    hooks.add_eraser(EXPORT_NAME, erase_recipients)
