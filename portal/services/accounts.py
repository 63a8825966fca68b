"""Accounts: sign up, verification, passwords, email changes. Answers never reveal whether an
address has an account; callers get the same outcome shape either way."""

from __future__ import annotations

import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from passlib.context import CryptContext
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.models.customer import Customer, UsedLink
from portal.outbox import changes
from portal.services import sign_ins
from portal.services.lookalikes import is_lookalike, skeleton

passwords = CryptContext(schemes=["argon2", "bcrypt"], deprecated="auto")
# Verified against when the address is unknown, so a miss costs as much time as a hit.
_DUMMY_HASH = passwords.hash(secrets.token_urlsafe(16))
MIN_PASSWORD = 10
MAX_PASSWORD = 256


class AccountError(ValueError):
    def __init__(self, code: str, field: str) -> None:
        super().__init__(code)
        self.code = code
        self.field = field


def new_public_id() -> str:
    return "cus_" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")


def normalize_email(raw: str) -> str:
    """The one form an address is stored and looked up in: NFKC first (a fullwidth
    ``ｄemo@example.com`` is ``demo@example.com``), then validated, IDNA-normalized and
    lower-cased."""
    try:
        result = validate_email(unicodedata.normalize("NFKC", raw or "").strip(),
                                check_deliverability=False)
    except EmailNotValidError as exc:
        raise AccountError("invalid_email", "email") from exc
    return result.normalized.lower()


def email_key(raw: str) -> str:
    """``raw`` in its stored form when it is a valid address, else as typed but with the same
    folding: what rate limits count per address, so that no spelling of one address escapes
    the count of another."""
    try:
        return normalize_email(raw)
    except AccountError:
        return unicodedata.normalize("NFKC", raw or "").strip().lower()


def check_not_lookalike(session: Session, email: str, customer: Customer | None = None) -> None:
    """Refuse a (normalized) address that only differs from an existing customer's by
    look-alike letters (``dеmo@`` with a Cyrillic ``е`` when ``demo@`` exists): it would be a
    second customer that people, and the first one's owner, take for the first. An address
    without such letters is never refused, so nobody can lock the real owner out by taking a
    look-alike first. Raises ``email_lookalike``, naming no account."""
    if not is_lookalike(email):
        return
    other = find_by_email(session, skeleton(email))
    if other is not None and other is not customer:
        raise AccountError("email_lookalike", "email")


def normalize_phone(raw: str, region: str | None = None) -> str:
    """E.164, validated; a number without a country code is read in ``region``."""
    try:
        number = phonenumbers.parse((raw or "").strip(), region)
    except phonenumbers.NumberParseException as exc:
        raise AccountError("invalid_phone", "phone") from exc
    if not phonenumbers.is_valid_number(number):
        raise AccountError("invalid_phone", "phone")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def check_password(password: str, email: str | None = None) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError("password_too_short", "password")
    if len(password) > MAX_PASSWORD:
        raise AccountError("password_too_long", "password")
    if email and password.strip().lower() == email.lower():
        raise AccountError("password_is_email", "password")


def find_by_email(session: Session, email: str) -> Customer | None:
    return session.scalars(select(Customer).where(Customer.email == email)).first()


def find_by_public_id(session: Session, public_id: str) -> Customer | None:
    return session.scalars(select(Customer).where(Customer.public_id == public_id)).first()


def create_customer(
    session: Session,
    email: str | None,
    *,
    password: str | None = None,
    phone: str | None = None,
    locale: str | None = None,
    timezone: str | None = None,
    postal_address: str | None = None,
    source: str = "portal",
) -> Customer:
    if email and find_by_email(session, email) is not None:
        raise AccountError("email_taken", "email")
    if email:
        check_not_lookalike(session, email)
    if phone and session.scalars(select(Customer).where(Customer.phone == phone)).first():
        raise AccountError("phone_taken", "phone")
    customer = Customer(
        public_id=new_public_id(), email=email, phone=phone, locale=locale, timezone=timezone,
        postal_address=postal_address,
        password_hash=passwords.hash(password) if password else None,
    )
    session.add(customer)
    session.flush()
    changes.emit(session, "customer.created", {"customer": customer.public_id,
                                               "source": source}, customer.id)
    return customer


@dataclass(frozen=True)
class SignupResult:
    customer: Customer
    created: bool  # False: the address had an account; tell its owner, not the requester


def signup(session: Session, email: str, password: str, locale: str | None) -> SignupResult:
    email = normalize_email(email)
    check_password(password, email)
    existing = find_by_email(session, email)
    if existing is not None:
        passwords.hash(password)  # as slow as a real sign up: timing tells nothing either
        return SignupResult(existing, False)
    return SignupResult(create_customer(session, email, password=password, locale=locale), True)


def authenticate(session: Session, email: str, password: str) -> Customer | None:
    """The customer if the password matches; upgrades old hashes on the way."""
    try:
        email = normalize_email(email)
    except AccountError:
        email = ""
    customer = find_by_email(session, email) if email else None
    if len(password) > MAX_PASSWORD:
        # passlib raises on very long secrets; such a password was never accepted anyway.
        customer, password = None, password[:MAX_PASSWORD]
    if customer is None or not customer.password_hash or customer.erased_at is not None:
        passwords.verify(password, _DUMMY_HASH)
        return None
    ok, new_hash = passwords.verify_and_update(password, customer.password_hash)
    if not ok:
        return None
    if new_hash:
        customer.password_hash = new_hash
    return customer


def verify_password(customer: Customer, password: str) -> bool:
    if not customer.password_hash or len(password) > MAX_PASSWORD:
        return False  # longer than any password we accept (and passlib raises past 4 KiB)
    return bool(passwords.verify(password, customer.password_hash))


def mark_email_verified(session: Session, customer: Customer, email: str) -> bool:
    """True if this verified the address now (a stale link for an old address does nothing)."""
    if customer.email != email:
        return False
    if customer.email_verified_at is None:
        customer.email_verified_at = utcnow()
        changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                                   "fields": ["email_verified"]}, customer.id)
    return True


def set_password(session: Session, customer: Customer, password: str) -> None:
    """New password; every session and outstanding reset or sign-in link stops working."""
    check_password(password, customer.email)
    customer.password_hash = passwords.hash(password)
    customer.auth_epoch += 1
    sign_ins.end_all(session, customer)


def request_email_change(session: Session, customer: Customer, new_email: str) -> str:
    new_email = normalize_email(new_email)
    if new_email == customer.email:
        raise AccountError("same_email", "email")
    customer.pending_email = new_email
    return new_email


def confirm_email_change(session: Session, customer: Customer, new_email: str) -> str | None:
    """Make the pending address the customer's; returns the address it replaces, whose owner
    must be told (and may undo the change). Every earlier link and session ends: they were
    given to, or opened by, whoever had the old address."""
    if customer.pending_email != new_email or customer.erased_at is not None:
        raise AccountError("stale_link", "email")
    if find_by_email(session, new_email) is not None:
        raise AccountError("email_taken", "email")
    check_not_lookalike(session, new_email, customer)
    old_email = customer.email
    customer.email = new_email
    customer.pending_email = None
    customer.email_verified_at = utcnow()
    customer.auth_epoch += 1
    sign_ins.end_all(session, customer)
    changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                               "fields": ["email"]}, customer.id)
    return old_email


def undo_email_change(session: Session, customer: Customer, old_email: str) -> None:
    """Give the account back to the address it had before a change (the link in the notice
    sent to that address). Ends every session and link again: whoever made the change is out."""
    if customer.erased_at is not None or customer.email == old_email:
        raise AccountError("stale_link", "email")
    if find_by_email(session, old_email) is not None:
        raise AccountError("email_taken", "email")
    customer.email = old_email
    customer.pending_email = None
    customer.email_verified_at = utcnow()  # the link reached that mailbox
    customer.auth_epoch += 1
    sign_ins.end_all(session, customer)
    changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                               "fields": ["email"]}, customer.id)


def link_used(session: Session, link_id: str) -> bool:
    return session.get(UsedLink, link_id) is not None if link_id else True


def use_link_once(session: Session, link_id: str, expires_at: datetime) -> bool:
    """Record that the single-use link ``link_id`` was followed; False if it already was.

    A primary key decides, so two requests racing with the same link cannot both win (a
    fingerprint of the customer's state, as reset links use, would let both read the same
    state first). Ids of links past their own expiry are forgotten on the way: such a link
    is refused by its signature's age anyway."""
    session.execute(delete(UsedLink).where(UsedLink.expires_at < utcnow()))
    if not link_id or len(link_id) > 32:
        return False
    try:
        with session.begin_nested():
            session.add(UsedLink(id=link_id, expires_at=expires_at))
    except IntegrityError:
        return False
    return True
