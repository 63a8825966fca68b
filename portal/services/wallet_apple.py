"""Apple Wallet loyalty cards: issuing a member's card, keeping it current, and the devices
that hold it.

A card is issued once per member (:func:`ensure_pass`) with a serial number and an
authentication token that never change; every later download re-signs the same card with the
member's current balance, tier and news (:func:`card_for`). When something printed on the
card changes, :func:`notify_pass_changed` advances the card's update tag and queues a push for
every registered device, in the caller's transaction, so the push exists if and only if the
change committed.

Update tags are ordered like the change feed (``portal/outbox/feed.py``): the writer's PostgreSQL
transaction id, then a counter. :func:`serials_updated_since` only moves a device's
``lastUpdated`` past updates whose transaction is older than every running one, so a card
updated by a transaction that commits late is reported on the next ask instead of being
skipped (an update reported twice only costs the device a ``304``).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import and_, case, delete, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from passes.apple import DEFAULT_STRINGS, News, PassCredentials, StoreCard, build_store_card
from portal.core.db import utcnow
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import LoyaltyProgram
from portal.models.customer import Customer
from portal.models.google_wallet import WalletFeedCursor
from portal.models.wallet import AppleDeviceRegistration, ApplePass, ApplePush, WalletNews
from portal.outbox import changes, feed
from portal.services.catalog import LOCALES
from portal.services.privacy import PrivacyHooks

log = logging.getLogger("carnet.wallet.apple")

#: The change-feed consumer that keeps Apple cards current (``wallet_feed_cursors.consumer``).
FEED_CONSUMER: Final = "apple_pass"
#: Where the PassKit web service lives under the public base URL.
WEB_SERVICE_PATH: Final = "/wallet/apple"
_TAG_RE: Final = re.compile(r"([0-9]{1,19})_([0-9]{1,19})")
_MAX_ID: Final = 2**63 - 1

# What the card says besides the programme's own texts, per language. The pass carries every
# language and Wallet picks the device's (``<lang>.lproj/pass.strings``).
CARD_TEXTS: Final[dict[str, dict[str, str]]] = {
    "en": {
        "card.description": "{programme} card",
        "nextTier.one": "{points} point to {tier}",
        "nextTier.other": "{points} points to {tier}",
        "nextTier.top": "Highest tier reached",
    },
    "fr": {
        "card.description": "Carte {programme}",
        "nextTier.one": "{points} point avant {tier}",
        "nextTier.other": "{points} points avant {tier}",
        "nextTier.top": "Statut le plus élevé atteint",
    },
}


class PassTagError(ValueError):
    """``passesUpdatedSince`` is not a tag this service handed out."""


@dataclass(frozen=True)
class CardSettings:
    """The deployment's part of a card, as plain values (the app builds it from config)."""

    pass_type_id: str
    team_id: str
    base_url: str
    program: LoyaltyProgram
    background_color: str = "rgb(35, 64, 143)"
    foreground_color: str = "rgb(255, 255, 255)"
    label_color: str = "rgb(196, 211, 255)"
    manage_path: str = "/preferences"
    allow_http: bool = False
    images: dict[str, bytes] | None = field(default=None, compare=False)

    @property
    def web_service_url(self) -> str:
        return self.base_url.rstrip("/") + WEB_SERVICE_PATH


# --- issuing -----------------------------------------------------------------------------------


def find_pass(session: Session, member: Member) -> ApplePass | None:
    return session.scalars(select(ApplePass).where(ApplePass.member_id == member.id)).first()


def find_by_serial(session: Session, serial_number: str) -> ApplePass | None:
    return session.scalars(
        select(ApplePass).where(ApplePass.serial_number == serial_number)
    ).first()


def ensure_pass(session: Session, member: Member) -> ApplePass:
    """The member's card, issued now if it does not exist yet.

    Issuing the very first card also starts the feed consumer that keeps cards current, at
    a point no later than any change this card does not already reflect.
    """
    existing = find_pass(session, member)
    if existing is not None:
        return existing
    now = utcnow()
    try:
        with session.begin_nested():
            apple_pass = ApplePass(
                member_id=member.id,
                serial_number=secrets.token_hex(16),
                authentication_token=secrets.token_urlsafe(32),
                update_txid=0,
                update_tag=0,
                updated_at=now,
                created_at=now,
            )
            session.add(apple_pass)
            session.flush()
    except IntegrityError:  # a second tab issued it at the same moment
        raced = find_pass(session, member)
        if raced is None:
            raise
        return raced
    _advance(session, apple_pass, now, first=True)
    _start_following(session)
    return apple_pass


def token_matches(apple_pass: ApplePass, token: str) -> bool:
    """Whether ``token`` is the card's authentication token (constant-time comparison)."""
    return hmac.compare_digest(apple_pass.authentication_token.encode(), token.encode())


def authenticate(session: Session, serial_number: str, token: str) -> ApplePass | None:
    """The card if ``token`` is its authentication token."""
    apple_pass = find_by_serial(session, serial_number)
    if apple_pass is None or not token_matches(apple_pass, token):
        return None
    return apple_pass


# --- what the card shows -----------------------------------------------------------------------


def latest_news(session: Session, member: Member) -> WalletNews | None:
    return session.scalars(
        select(WalletNews)
        .where(WalletNews.member_id == member.id)
        .order_by(WalletNews.created_at.desc(), WalletNews.id.desc())
        .limit(1)
    ).first()


def member_name(customer: Customer | None, member: Member) -> str:
    """Customers have no name field: the card shows how they sign in (their address)."""
    name = getattr(customer, "name", None) or (customer.email if customer else None)
    return str(name) if name else member.member_number


def _localized(table: dict[str, Any], locale: str, key: str, fallback: str) -> str:
    variant = table.get(locale)
    if isinstance(variant, dict) and isinstance(variant.get(key), str) and variant[key].strip():
        return str(variant[key])
    return fallback


def card_for(
    session: Session, member: Member, settings: CardSettings, now: datetime | None = None
) -> StoreCard:
    """Everything printed on the member's card now (issuing the card if needed).

    Texts that depend on the language (tier names, the next tier, terms, news) are written
    as ``pass.strings`` keys with an entry per language, so the card follows the device's
    language rather than the language of whoever downloaded it.
    """
    apple_pass = ensure_pass(session, member)
    program = settings.program
    customer = session.get(Customer, member.customer_id)
    progress = ledger.progress(session, program, member, now)
    news = latest_news(session, member)
    tier = program.tier(member.tier) or progress.tier
    strings: dict[str, dict[str, str]] = {}
    for locale in LOCALES:
        texts = CARD_TEXTS.get(locale, CARD_TEXTS["en"])
        table = dict(DEFAULT_STRINGS.get(locale, DEFAULT_STRINGS["en"]))
        table["programme.name"] = program.name(locale)
        table["card.description"] = texts["card.description"].format(
            programme=program.name(locale)
        )
        for each in program.tiers:
            table[f"tier.{each.key}"] = each.name(locale)
        if progress.next_tier is None:
            table["nextTier.value"] = texts["nextTier.top"]
        else:
            form = "nextTier.one" if progress.points_to_next == 1 else "nextTier.other"
            table["nextTier.value"] = texts[form].format(
                points=_number(progress.points_to_next, locale),
                tier=progress.next_tier.name(locale),
            )
        table["terms.value"] = program.terms.text(locale)
        if news is not None:
            table["news.header"] = _localized(news.locales or {}, locale, "header", news.header)
            table["news.body"] = _localized(news.locales or {}, locale, "body", news.body)
        strings[locale] = table
    return StoreCard(
        pass_type_id=settings.pass_type_id,
        team_id=settings.team_id,
        serial_number=apple_pass.serial_number,
        organization_name=program.name("en"),
        description="card.description",
        logo_text="programme.name",
        member_name=member_name(customer, member),
        member_number=member.member_number,
        points=member.balance,
        tier=f"tier.{tier.key}",
        next_tier="nextTier.value",
        web_service_url=settings.web_service_url,
        authentication_token=apple_pass.authentication_token,
        background_color=settings.background_color,
        foreground_color=settings.foreground_color,
        label_color=settings.label_color,
        terms="terms.value",
        manage_url=settings.base_url.rstrip("/") + settings.manage_path,
        strings=strings,
        news=News("news.header", "news.body") if news is not None else None,
        images=settings.images,
    )


def _number(value: int, locale: str) -> str:
    from babel.numbers import format_decimal

    return str(format_decimal(value, locale=locale))


def build_pkpass(
    session: Session,
    member: Member,
    settings: CardSettings,
    credentials: PassCredentials,
    now: datetime | None = None,
) -> tuple[bytes, ApplePass]:
    """The signed ``.pkpass`` of the member's card, and the card's row (for Last-Modified)."""
    card = card_for(session, member, settings, now)
    data = build_store_card(card, credentials, allow_http=settings.allow_http)
    apple_pass = find_pass(session, member)
    assert apple_pass is not None
    return data, apple_pass


def last_modified(apple_pass: ApplePass) -> datetime:
    """The card's Last-Modified, at the one-second precision of HTTP dates."""
    return apple_pass.updated_at.replace(microsecond=0)


# --- updates -----------------------------------------------------------------------------------


def notify_pass_changed(session: Session, member: Member, reason: str) -> ApplePass | None:
    """Something printed on the member's card changed: advance its update tag and owe every
    device holding it a push. Runs in the caller's transaction; returns the card, or None
    when the member has no Apple card (then nothing is done)."""
    apple_pass = find_pass(session, member)
    if apple_pass is None:
        return None
    now = utcnow()
    _advance(session, apple_pass, now)
    registrations = list(
        session.scalars(
            select(AppleDeviceRegistration.id).where(
                AppleDeviceRegistration.pass_id == apple_pass.id
            )
        )
    )
    for registration_id in registrations:
        _queue_push(session, registration_id, apple_pass.update_tag, now)
    log.debug("apple pass %s changed (%s): %d pushes queued", apple_pass.serial_number,
              reason, len(registrations))
    return apple_pass


def _advance(session: Session, apple_pass: ApplePass, now: datetime, *,
             first: bool = False) -> None:
    # Lock and reload the card's row (PostgreSQL) so concurrent updates of one card queue up.
    session.execute(
        select(ApplePass).where(ApplePass.id == apple_pass.id).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    top = session.scalar(select(func.max(ApplePass.update_tag))) or 0
    apple_pass.update_txid = changes.current_txid(session)
    apple_pass.update_tag = int(top) + 1
    if not first:
        # Last-Modified has one-second precision: each update moves it on by at least a
        # second, or a device that fetched earlier in the same second would get a 304.
        apple_pass.updated_at = max(now, last_modified(apple_pass) + timedelta(seconds=1))
    session.flush()


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table))


def _queue_push(session: Session, registration_id: int, tag: int, now: datetime) -> None:
    """One pending push per registration: a newer update re-arms it with the newer tag. A
    push already backing off after failures keeps its schedule."""
    statement = _insert(session, ApplePush).values(
        registration_id=registration_id, tag=tag, attempts=0, next_attempt_at=now,
        created_at=now,
    )
    statement = statement.on_conflict_do_update(
        index_elements=[ApplePush.registration_id],
        set_={
            "tag": statement.excluded.tag,
            "next_attempt_at": case(
                (ApplePush.attempts > 0, ApplePush.next_attempt_at),
                else_=statement.excluded.next_attempt_at,
            ),
        },
    )
    session.execute(statement)


# --- devices -----------------------------------------------------------------------------------


def register_device(
    session: Session, apple_pass: ApplePass, device_id: str, push_token: str
) -> bool:
    """Remember that ``device_id`` holds the card; True if this is a new registration.
    A known device registering again may bring a new push token."""
    now = utcnow()
    existing = session.scalars(
        select(AppleDeviceRegistration).where(
            AppleDeviceRegistration.device_library_identifier == device_id,
            AppleDeviceRegistration.pass_id == apple_pass.id,
        )
    ).first()
    if existing is not None:
        if existing.push_token != push_token:
            existing.push_token = push_token
            existing.updated_at = now
            session.flush()
        return False
    try:
        with session.begin_nested():
            session.add(
                AppleDeviceRegistration(
                    device_library_identifier=device_id, push_token=push_token,
                    pass_id=apple_pass.id, created_at=now, updated_at=now,
                )
            )
            session.flush()
    except IntegrityError:  # the same device registering twice at once
        return False
    return True


def unregister_device(session: Session, apple_pass: ApplePass, device_id: str) -> bool:
    """Forget a device (the card was removed from it); True if it was registered."""
    result = session.execute(
        delete(AppleDeviceRegistration).where(
            AppleDeviceRegistration.device_library_identifier == device_id,
            AppleDeviceRegistration.pass_id == apple_pass.id,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def registrations(session: Session, apple_pass: ApplePass) -> list[AppleDeviceRegistration]:
    return list(
        session.scalars(
            select(AppleDeviceRegistration)
            .where(AppleDeviceRegistration.pass_id == apple_pass.id)
            .order_by(AppleDeviceRegistration.id)
        )
    )


def parse_tag(raw: str | None) -> tuple[int, int]:
    if not raw:
        return (0, 0)
    match = _TAG_RE.fullmatch(raw)
    if match is None:
        raise PassTagError("not a tag given by this service")
    return int(match.group(1)), int(match.group(2))


def _horizon(session: Session) -> tuple[int | None, int | None]:
    """(oldest running transaction id, own transaction id) on PostgreSQL; (None, None) on
    SQLite, where writers are serialised and every committed update is final."""
    if session.get_bind().dialect.name != "postgresql":
        return None, None
    xmin = int(session.execute(
        text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")).scalar_one())
    own = session.execute(
        text("SELECT pg_current_xact_id_if_assigned()::text::bigint")).scalar_one()
    return xmin, (int(own) if own is not None else None)


def serials_updated_since(
    session: Session, device_id: str, since: str | None
) -> tuple[list[str], str] | None:
    """Serial numbers of the cards on ``device_id`` updated after the tag ``since``, and the
    tag to give back as ``lastUpdated``; None when there are none (the device gets 204).

    Raises :class:`PassTagError` for a tag this service never handed out.
    """
    after_txid, after_tag = parse_tag(since)
    horizon, own = _horizon(session)
    rows = session.execute(
        select(ApplePass.serial_number, ApplePass.update_txid, ApplePass.update_tag)
        .join(AppleDeviceRegistration, AppleDeviceRegistration.pass_id == ApplePass.id)
        .where(
            AppleDeviceRegistration.device_library_identifier == device_id,
            or_(
                ApplePass.update_txid > after_txid,
                and_(ApplePass.update_txid == after_txid, ApplePass.update_tag > after_tag),
            ),
        )
        .order_by(ApplePass.update_txid, ApplePass.update_tag)
    ).all()
    if not rows:
        return None
    last = (after_txid, after_tag)
    for _serial, txid, tag in rows:
        settled = horizon is None or txid < horizon or txid == own
        if settled and (txid, tag) > last:
            last = (txid, tag)
    return [serial for serial, _txid, _tag in rows], f"{last[0]}_{last[1]}"


# --- following the change feed -----------------------------------------------------------------

def _start_following(session: Session) -> None:
    """Create the consumer's cursor (once) no later than any change not yet committed."""
    horizon, _own = _horizon(session)
    start = (
        feed.Cursor(horizon - 1, _MAX_ID) if horizon is not None else feed.head(session)
    )
    statement = _insert(session, WalletFeedCursor).values(
        consumer=FEED_CONSUMER, cursor_txid=start.txid, cursor_id=start.id, updated_at=utcnow()
    ).on_conflict_do_nothing(index_elements=[WalletFeedCursor.consumer])
    session.execute(statement)


EXPORT_NAME = "apple_wallet"


def export_card(session: Session, customer: Customer) -> dict[str, Any] | None:
    """The customer's Apple Wallet card: its serial, the devices holding it (their library
    ids; push tokens and the card's token are credentials and stay out) and its news."""
    row = session.execute(
        select(ApplePass, Member.id).join(Member, Member.id == ApplePass.member_id)
        .where(Member.customer_id == customer.id)).first()
    if row is None:
        return None
    apple_pass, member_id = row
    return {
        "serial_number": apple_pass.serial_number,
        "created_at": apple_pass.created_at.isoformat(),
        "updated_at": apple_pass.updated_at.isoformat(),
        "devices": [
            {"device_library_identifier": r.device_library_identifier,
             "registered_at": r.created_at.isoformat(), "updated_at": r.updated_at.isoformat()}
            for r in registrations(session, apple_pass)
        ],
        "news": [
            {"header": n.header, "body": n.body, "message": n.message_ref,
             "created_at": n.created_at.isoformat()}
            for n in session.scalars(select(WalletNews).where(WalletNews.member_id == member_id)
                                     .order_by(WalletNews.id))
        ],
    }


def erase_devices(session: Session, customer: Customer) -> None:
    """Erasure: forget which devices hold the person's card. Device library ids and push
    tokens identify a phone; queued pushes go with their registrations (ON DELETE CASCADE).
    The news shown on the card goes too; the pass row stays (its serial is pseudonymous)."""
    members = select(Member.id).where(Member.customer_id == customer.id)
    passes = select(ApplePass.id).where(ApplePass.member_id.in_(members))
    registrations = select(AppleDeviceRegistration.id).where(
        AppleDeviceRegistration.pass_id.in_(passes))
    session.execute(delete(ApplePush).where(ApplePush.registration_id.in_(registrations)))
    session.execute(delete(AppleDeviceRegistration).where(
        AppleDeviceRegistration.pass_id.in_(passes)))
    session.execute(delete(WalletNews).where(WalletNews.member_id.in_(members)))


def register_privacy(hooks: PrivacyHooks) -> None:
    """Device registrations (library ids, push tokens) and card news are personal data."""
    hooks.add_exporter(EXPORT_NAME, export_card)
    hooks.add_eraser(EXPORT_NAME, erase_devices)
