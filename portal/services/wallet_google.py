"""Google Wallet loyalty cards kept up to date: save links, and the sync from the change feed.

The card is issued by a signed save link that embeds the class and the object, so it works
before Google has heard of either. From then on the change feed drives the card: a consumer
with a persisted cursor marks the member's card pending in the same transaction that moves the
cursor, and the worker PATCHes pending cards, creating the class and object first when Google
does not know them. A card stays pending until Google accepted the update, so a worker that
dies between claim and send only delays the update until its lease expires.

Notifications: Google shows at most three notifying updates or messages per card in 24 hours
and silently drops the rest. Carnet counts them (:class:`GoogleNotification`) and sends the
fourth update without ``notifyPreference``: the card still changes, the phone stays quiet.

Like webhook delivery, :func:`sync_pending` manages its own transactions: it must not hold
one open across network calls, and each result must be recorded before the next card.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from babel.numbers import format_decimal
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from passes import google as gpass
from portal.core.db import utcnow
from portal.delivery.google_wallet import (
    GoogleWalletClient,
    GoogleWalletError,
    GoogleWalletNotFoundError,
)
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import LoyaltyProgram
from portal.models.customer import Customer
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject, WalletFeedCursor
from portal.outbox import feed
from portal.services.privacy import PrivacyHooks

log = logging.getLogger("carnet.wallet.google")

CONSUMER = "google_wallet"
#: The changes that alter what a card shows.
CARD_CHANGES = ["loyalty.points_changed", "loyalty.tier_changed", "loyalty.left",
                "loyalty.enrolled"]
#: The brand colour of the portal (static/css/carnet.css ``--brand``).
BACKGROUND = "#0b5c4a"
LOGO_PATH = "/static/img/google-wallet-program-logo.png"
LOCALES = ("en", "fr")
NEXT_TIER = {"en": "{points} points to {tier}",
             "fr": "Encore {points} points pour atteindre le statut {tier}"}
NOTIFICATION_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class GoogleSettings:
    """What the Google side needs from the configuration, as plain data (no Flask)."""

    issuer_id: str
    class_suffix: str
    issuer_name: str
    service_account_file: str | None
    api_url: str
    origins: tuple[str, ...]
    base_url: str

    @property
    def configured(self) -> bool:
        """A key file to sign with: without one the portal shows no Google button."""
        return bool(self.service_account_file) and Path(str(self.service_account_file)).is_file()

    @property
    def class_id(self) -> str:
        return f"{self.issuer_id}.{self.class_suffix}"


def settings_from(config: Mapping[str, Any]) -> GoogleSettings:
    """Settings from the application's configuration mapping."""
    base = str(config["BASE_URL"]).rstrip("/")
    raw = config.get("GOOGLE_WALLET_ORIGINS")
    if raw:
        origins = tuple(o.strip().rstrip("/") for o in str(raw).split(",") if o.strip())
    else:
        parts = urlsplit(base)
        origins = (f"{parts.scheme}://{parts.netloc}",)
    return GoogleSettings(
        issuer_id=str(config["GOOGLE_ISSUER_ID"]),
        class_suffix=str(config["GOOGLE_WALLET_CLASS_SUFFIX"]),
        issuer_name=str(config["GOOGLE_WALLET_ISSUER_NAME"]),
        service_account_file=config.get("GOOGLE_SERVICE_ACCOUNT_FILE"),
        api_url=str(config["GOOGLE_WALLET_API_URL"]),
        origins=origins,
        base_url=base,
    )


def service_account_info(settings: GoogleSettings) -> dict[str, Any]:
    """The key file's content, read once per file version (it never changes in practice)."""
    path = Path(str(settings.service_account_file))
    return dict(_read_key(str(path), path.stat().st_mtime_ns))


@lru_cache(maxsize=4)
def _read_key(path: str, _mtime: int) -> Mapping[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


def new_client(settings: GoogleSettings) -> GoogleWalletClient:
    """A REST client for the worker's lifetime (it caches the token and the connection)."""
    return GoogleWalletClient(str(settings.service_account_file), base_url=settings.api_url)


# --- plain data for passes.google ---------------------------------------------------------------


def _locale(customer: Customer | None) -> str:
    locale = (customer.locale if customer is not None else None) or "en"
    return locale if locale in LOCALES else "en"


def program_data(program: LoyaltyProgram, settings: GoogleSettings) -> gpass.LoyaltyProgram:
    """The programme as one LoyaltyClass: names in every language the catalog has."""
    return gpass.LoyaltyProgram(
        issuer_id=settings.issuer_id,
        class_suffix=settings.class_suffix,
        issuer_name=settings.issuer_name,
        program_name=program.name("en"),
        program_logo_uri=settings.base_url + LOGO_PATH,
        hex_background_color=BACKGROUND,
        localized_program_name={loc: program.name(loc) for loc in LOCALES},
    )


@dataclass(frozen=True)
class CardData:
    """What one member's card shows, and the values the sync compares."""

    member: gpass.LoyaltyMember
    active: bool

    @property
    def points(self) -> int:
        return self.member.points

    @property
    def tier(self) -> str:
        return self.member.tier_name

    @property
    def state(self) -> str:
        return "ACTIVE" if self.active else "INACTIVE"

    @property
    def shown(self) -> tuple[int, str, str]:
        return (self.points, self.tier, self.state)


def _synced(card: GoogleWalletObject) -> tuple[int | None, str | None, str | None]:
    return (card.synced_points, card.synced_tier, card.synced_state)


def member_data(session: Session, program: LoyaltyProgram, member: Member,
                settings: GoogleSettings, now: datetime | None = None) -> CardData:
    """The member's card, in the member's language. A negative balance (a refund after the
    points were spent) shows as 0: Google refuses negative balances."""
    customer = session.get(Customer, member.customer_id)
    locale = _locale(customer)
    progress = ledger.progress(session, program, member, now)
    tier = program.tier(member.tier) or progress.tier
    next_text = ""
    if progress.next_tier is not None and member.left_at is None:
        next_text = NEXT_TIER[locale].format(
            points=format_decimal(progress.points_to_next, locale=locale),
            tier=progress.next_tier.name(locale))
    account_name = (customer.email if customer is not None else None) or member.member_number
    return CardData(gpass.LoyaltyMember(
        member_number=member.member_number,
        account_name=account_name,
        points=max(member.balance, 0),
        tier_name=tier.name(locale),
        next_tier_text=next_text,
        manage_preferences_url=settings.base_url + "/preferences",
        locale=locale,
    ), active=member.left_at is None)


def object_body(program: LoyaltyProgram, settings: GoogleSettings, card: CardData
                ) -> dict[str, Any]:
    return gpass.build_loyalty_object(program_data(program, settings), card.member,
                                      state=card.state)


# --- issuing the card ---------------------------------------------------------------------------


def card_for(session: Session, member: Member) -> GoogleWalletObject | None:
    return session.scalars(select(GoogleWalletObject)
                           .where(GoogleWalletObject.member_id == member.id)).first()


def issue_card(session: Session, program: LoyaltyProgram, member: Member,
               settings: GoogleSettings, card: CardData, now: datetime) -> GoogleWalletObject:
    """Record that the member was handed a link: from now on their card is kept in sync.

    A new row starts pending when Google may hold an older version of this member's object
    (the member saved a link long ago, the row was lost): the first sync settles it.
    """
    row = card_for(session, member)
    if row is None:
        row = GoogleWalletObject(
            member_id=member.id,
            object_id=gpass.object_id_for(settings.issuer_id, member.member_number),
            class_id=settings.class_id, link_issued_at=now, attempts=0,
            synced_points=card.points, synced_tier=card.tier, synced_state=card.state)
        session.add(row)
        session.flush()
    else:
        row.link_issued_at = now
    return row


def save_link(session: Session, program: LoyaltyProgram, member: Member,
              settings: GoogleSettings, *, now: datetime | None = None) -> str:
    """The signed "Add to Google Wallet" link for ``member``, with the class and the object
    embedded so it works even before the worker has inserted them over REST."""
    now = now or utcnow()
    card = member_data(session, program, member, settings, now)
    issue_card(session, program, member, settings, card, now)
    info = service_account_info(settings)
    claims = gpass.build_save_jwt_claims(
        info["client_email"], list(settings.origins), object_body(program, settings, card),
        gpass.build_loyalty_class(program_data(program, settings)),
        issued_at=int(now.timestamp()))
    return gpass.sign_save_link(info, claims)


# --- the change feed consumer -------------------------------------------------------------------


def _cursor_row(session: Session, consumer: str) -> WalletFeedCursor:
    row = session.scalars(select(WalletFeedCursor).where(WalletFeedCursor.consumer == consumer)
                          .with_for_update()).first()
    if row is None:
        row = WalletFeedCursor(consumer=consumer, cursor_txid=0, cursor_id=0)
        session.add(row)
        session.flush()
    return row


def mark_pending_from_feed(session: Session, *, batch: int = 500,
                           now: datetime | None = None) -> int:
    """Read the feed after the consumer's cursor and mark the cards it concerns pending.

    The marks and the cursor move in the caller's transaction: if it does not commit, the
    same changes are read again. Returns the number of cards newly marked.
    """
    now = now or utcnow()
    cursor_row = _cursor_row(session, CONSUMER)
    cursor = feed.Cursor(cursor_row.cursor_txid, cursor_row.cursor_id)
    marked = 0
    while True:
        rows, cursor = feed.read(session, cursor, batch, CARD_CHANGES)
        first: dict[int, int] = {}
        for change in rows:
            if change.customer_id is not None:
                first.setdefault(change.customer_id, change.id)
        if first:
            cards = session.execute(
                select(GoogleWalletObject, Member.customer_id)
                .join(Member, Member.id == GoogleWalletObject.member_id)
                .where(Member.customer_id.in_(first))).all()
            for card, customer_id in cards:
                if card.pending_change_id is None:
                    card.pending_change_id = first[customer_id]
                    card.pending_since = now
                    marked += 1
        if (cursor.txid, cursor.id) == (cursor_row.cursor_txid, cursor_row.cursor_id):
            break
        cursor_row.cursor_txid, cursor_row.cursor_id = cursor.txid, cursor.id
    return marked


# --- sending ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Retry policy for transient errors: doubling delays with jitter, Retry-After honoured."""

    base_seconds: float = 30.0
    max_seconds: float = 3600.0
    lease_seconds: float = 120.0

    def delay(self, attempts: int, retry_after: float | None) -> timedelta:
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        seconds = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            seconds = max(seconds, min(retry_after, self.max_seconds))
        return timedelta(seconds=seconds)


@dataclass
class SyncReport:
    marked: int = 0
    claimed: int = 0
    updated: int = 0
    created: int = 0
    notified: int = 0
    unchanged: int = 0
    retrying: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.marked} marked, {self.claimed} claimed: {self.updated} updated "
                f"({self.notified} with a notification), {self.created} created, "
                f"{self.unchanged} unchanged, {self.retrying} to retry, {self.failed} failed")


def recent_notifications(session: Session, card: GoogleWalletObject, now: datetime
                         ) -> list[datetime]:
    return list(session.scalars(select(GoogleNotification.sent_at).where(
        GoogleNotification.object_row_id == card.id,
        GoogleNotification.sent_at > now - NOTIFICATION_WINDOW)))


def may_notify(session: Session, card: GoogleWalletObject, now: datetime) -> bool:
    """One more notification fits the card's 3-per-24h quota (updates and messages alike)."""
    return gpass.notifications_allowed(recent_notifications(session, card, now), now)


def claim_due(session: Session, now: datetime, backoff: Backoff, limit: int = 100
              ) -> list[int]:
    """Lease pending cards that are due; ``SKIP LOCKED`` lets several workers share them."""
    ids = list(session.scalars(
        select(GoogleWalletObject.id).where(
            GoogleWalletObject.pending_change_id.is_not(None),
            or_(GoogleWalletObject.next_attempt_at.is_(None),
                GoogleWalletObject.next_attempt_at <= now),
            or_(GoogleWalletObject.leased_until.is_(None),
                GoogleWalletObject.leased_until < now),
        ).order_by(GoogleWalletObject.pending_change_id).limit(limit)
        .with_for_update(skip_locked=True)))
    if ids:
        session.execute(update(GoogleWalletObject).where(GoogleWalletObject.id.in_(ids))
                        .values(leased_until=now + timedelta(seconds=backoff.lease_seconds)))
    return ids


@dataclass(frozen=True)
class _Outcome:
    resource: dict[str, Any]
    created: bool
    patched: bool


def _push(client: GoogleWalletClient, program: LoyaltyProgram, settings: GoogleSettings,
          card: GoogleWalletObject, data: CardData, notify: bool) -> _Outcome:
    """PATCH the object; when Google does not know it, create the class and the object from
    the member's current data (a new object needs no update, and nobody has it to notify)."""
    patch = gpass.build_points_patch(data.member, notify=notify)
    patch["state"] = data.state
    try:
        return _Outcome(client.patch_object(card.object_id, patch), False, True)
    except GoogleWalletNotFoundError:
        pass
    client.ensure_class(gpass.build_loyalty_class(program_data(program, settings)))
    ensured = client.ensure_object(object_body(program, settings, data))
    if ensured.created:
        return _Outcome(ensured.resource, True, False)
    # Created meanwhile (the member saved the link): it holds the link's data, update it.
    return _Outcome(client.patch_object(card.object_id, patch), False, True)


def sync_card(make_session: Callable[[], Session], client: GoogleWalletClient,
              program: LoyaltyProgram, settings: GoogleSettings, card_id: int, now: datetime,
              backoff: Backoff, report: SyncReport) -> None:
    """Bring one claimed card up to date and record the outcome."""
    session = make_session()
    try:
        with session.begin():
            card = session.get(GoogleWalletObject, card_id)
            if card is None or card.pending_change_id is None:
                return
            member = session.get(Member, card.member_id)
            assert member is not None
            data = member_data(session, program, member, settings, now)
            if data.shown == _synced(card):
                _settled(card, now)
                report.unchanged += 1
                return
            visible = (data.points, data.tier) != (card.synced_points, card.synced_tier)
            notify = visible and data.active and may_notify(session, card, now)
        try:
            outcome = _push(client, program, settings, card, data, notify)
        except (GoogleWalletError, gpass.GoogleWalletValidationError) as exc:
            _record_failure(session, card_id, exc, now, backoff, report)
            return
        with session.begin():
            card = session.get(GoogleWalletObject, card_id)
            assert card is not None
            member = session.get(Member, card.member_id)
            assert member is not None
            card.synced_points, card.synced_tier, card.synced_state = data.shown
            card.synced_at = now
            if outcome.created:
                card.inserted_at = now
                report.created += 1
            else:
                report.updated += 1
                if card.inserted_at is None and card.saved_at is None:
                    card.saved_at = now   # it existed before we inserted it: saved by link
            if outcome.resource.get("hasUsers") and card.saved_at is None:
                card.saved_at = now
            if outcome.patched and notify:
                session.add(GoogleNotification(object_row_id=card.id, kind="update",
                                               sent_at=now))
                report.notified += 1
            current = member_data(session, program, member, settings, now)
            if current.shown == data.shown:
                _settled(card, now)
            else:   # changed while we were sending: go again
                card.leased_until = card.next_attempt_at = None
    finally:
        session.close()


def _settled(card: GoogleWalletObject, now: datetime) -> None:
    card.pending_change_id = card.pending_since = None
    card.attempts = 0
    card.next_attempt_at = card.leased_until = None
    card.last_error = card.failed_at = None


def _record_failure(session: Session, card_id: int, exc: Exception, now: datetime,
                    backoff: Backoff, report: SyncReport) -> None:
    with session.begin():
        card = session.get(GoogleWalletObject, card_id)
        assert card is not None
        card.last_error = str(exc)[:1000]
        card.leased_until = None
        if isinstance(exc, GoogleWalletError) and exc.retryable:
            card.attempts += 1
            card.next_attempt_at = now + backoff.delay(card.attempts, exc.retry_after)
            report.retrying += 1
        else:
            # Our request is wrong: retrying cannot help. The next change tries again.
            card.failed_at = now
            card.pending_change_id = card.pending_since = card.next_attempt_at = None
            card.attempts = 0
            report.failed += 1
        report.errors.append(f"{card.object_id}: {card.last_error}")


def sync_pending(make_session: Callable[[], Session], client: GoogleWalletClient,
                 program: LoyaltyProgram, settings: GoogleSettings, *,
                 now: datetime | None = None, backoff: Backoff | None = None,
                 limit: int = 100, mark_all: bool = False) -> SyncReport:
    """Consume the feed, then update every due card (up to ``limit``). ``mark_all`` makes
    every card pending first (the CLI's bulk resync after a change of design)."""
    now = now or utcnow()
    backoff = backoff or Backoff()
    report = SyncReport()
    session = make_session()
    try:
        with session.begin():
            report.marked = mark_pending_from_feed(session, now=now)
            if mark_all:
                result = session.execute(
                    update(GoogleWalletObject)
                    .where(GoogleWalletObject.pending_change_id.is_(None))
                    .values(pending_change_id=0, pending_since=now, next_attempt_at=None,
                            synced_points=None, synced_tier=None, synced_state=None))
                report.marked += int(getattr(result, "rowcount", 0) or 0)
        with session.begin():
            ids = claim_due(session, now, backoff, limit)
    finally:
        session.close()
    report.claimed = len(ids)
    for card_id in ids:
        try:
            sync_card(make_session, client, program, settings, card_id, now, backoff, report)
        except Exception as exc:  # one card's failure never stops the others
            _record_crash(make_session, card_id, exc, now, backoff, report)
    return report


def _record_crash(make_session: Callable[[], Session], card_id: int, exc: Exception,
                  now: datetime, backoff: Backoff, report: SyncReport) -> None:
    """An unexpected exception while syncing one card: retried with backoff, like a
    transient error, and logged by type only (its text may quote the member's data)."""
    log.error("Google Wallet card %s: sync raised %s; retried later", card_id,
              type(exc).__name__)
    session = make_session()
    try:
        with session.begin():
            card = session.get(GoogleWalletObject, card_id)
            if card is None:
                return
            card.attempts += 1
            card.last_error = f"unexpected error ({type(exc).__name__})"
            card.leased_until = None
            card.next_attempt_at = now + backoff.delay(card.attempts, None)
            report.retrying += 1
            report.errors.append(f"{card.object_id}: {card.last_error}")
    finally:
        session.close()


def saved_cards(session: Session, customer_ids: list[int]) -> dict[int, str]:
    """customer id -> Google object id, for members whose card is saved on a phone."""
    if not customer_ids:
        return {}
    return dict(session.execute(
        select(Member.customer_id, GoogleWalletObject.object_id)
        .join(GoogleWalletObject, GoogleWalletObject.member_id == Member.id)
        .where(and_(Member.customer_id.in_(customer_ids), Member.left_at.is_(None),
                    GoogleWalletObject.saved_at.is_not(None)))).all())


# --- privacy ------------------------------------------------------------------------------------

EXPORT_NAME = "google_wallet"


def export_card(session: Session, customer: Customer) -> dict[str, Any] | None:
    """The customer's Google Wallet card as this side knows it."""
    row = session.execute(
        select(GoogleWalletObject).join(Member, Member.id == GoogleWalletObject.member_id)
        .where(Member.customer_id == customer.id)).scalars().first()
    if row is None:
        return None
    notifications = session.scalars(select(GoogleNotification).where(
        GoogleNotification.object_row_id == row.id).order_by(GoogleNotification.id))
    return {
        "object_id": row.object_id,
        "link_issued_at": _iso(row.link_issued_at), "saved_at": _iso(row.saved_at),
        "synced_at": _iso(row.synced_at), "points": row.synced_points,
        "tier": row.synced_tier, "state": row.synced_state,
        "notifications": [{"kind": n.kind, "sent_at": _iso(n.sent_at)}
                          for n in notifications],
    }


def erase_card(session: Session, customer: Customer) -> None:
    """The row stays so that the worker can still set the card INACTIVE at Google (the
    membership's end is on the change feed); the last error, which may quote Google's
    answer about this member's object, goes."""
    members = select(Member.id).where(Member.customer_id == customer.id)
    session.execute(update(GoogleWalletObject)
                    .where(GoogleWalletObject.member_id.in_(members))
                    .values(last_error=None)
                    .execution_options(synchronize_session=False))


def register_privacy(hooks: PrivacyHooks) -> None:
    hooks.add_exporter(EXPORT_NAME, export_card)
    hooks.add_eraser(EXPORT_NAME, erase_card)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
