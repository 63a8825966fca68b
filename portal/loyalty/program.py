"""The loyalty programme as defined in the catalog file's ``[loyalty]`` table.

The programme is plain, immutable data: the ledger services receive it as an argument, so they
never read files or configuration themselves. Terms are proof of what a member accepted, so
they are kept like consent wording: one ``TopicWording`` row per version (topic key
``loyalty_terms``), and a changed text under an unchanged version number is refused.
"""

from __future__ import annotations

import calendar
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.models.catalog import TopicWording
from portal.services.catalog import (
    LOCALES,
    CatalogError,
    CatalogSpec,
    load_catalog_file,
    wording_hash,
)

TERMS_KEY = "loyalty_terms"
#: ``app.extensions`` key of the application's programme (None when the catalog has none).
PROGRAM_EXTENSION = "carnet.loyalty"


class LoyaltyProgramError(CatalogError):
    """The ``[loyalty]`` table is not usable; the message names the field at fault."""


@dataclass(frozen=True)
class Tier:
    key: str
    threshold: int
    names: dict[str, str]

    def name(self, locale: str) -> str:
        return self.names.get(locale) or self.names["en"]


@dataclass(frozen=True)
class NumberFormat:
    prefix: str
    length: int

    @property
    def random_digits(self) -> int:
        return self.length - len(self.prefix) - 1

    def generate(self) -> str:
        """A fresh candidate number: prefix, random digits, Luhn check digit."""
        body = self.prefix + "".join(str(secrets.randbelow(10))
                                     for _ in range(self.random_digits))
        return body + luhn_check_digit(body)

    def matches(self, number: str) -> bool:
        return (len(number) == self.length and number.isdigit()
                and number.startswith(self.prefix) and luhn_valid(number))


@dataclass(frozen=True)
class Terms:
    version: int
    texts: dict[str, str]

    @property
    def hash(self) -> str:
        return wording_hash(self.texts)

    def text(self, locale: str) -> str:
        return self.texts.get(locale) or self.texts["en"]


@dataclass(frozen=True)
class LoyaltyProgram:
    names: dict[str, str]
    descriptions: dict[str, str]
    number: NumberFormat
    tiers: tuple[Tier, ...]           # ascending thresholds, the first at 0
    tier_window_months: int
    expiry_months: int | None         # None: points never expire
    terms: Terms

    def name(self, locale: str) -> str:
        return self.names.get(locale) or self.names["en"]

    def description(self, locale: str) -> str:
        return self.descriptions.get(locale) or self.descriptions.get("en", "")

    @property
    def base_tier(self) -> Tier:
        return self.tiers[0]

    def tier(self, key: str) -> Tier | None:
        return next((t for t in self.tiers if t.key == key), None)

    def tier_for(self, earned: int) -> Tier:
        """The highest tier whose threshold the points earned in the window reach."""
        reached = self.tiers[0]
        for tier in self.tiers:
            if earned >= tier.threshold:
                reached = tier
        return reached

    def next_tier(self, earned: int) -> Tier | None:
        return next((t for t in self.tiers if t.threshold > earned), None)

    def expires_at(self, earned_at: datetime) -> datetime | None:
        if self.expiry_months is None:
            return None
        return add_months(earned_at, self.expiry_months)

    def window_start(self, now: datetime) -> datetime:
        return add_months(now, -self.tier_window_months)


# --- Luhn and calendar helpers -----------------------------------------------------------------


def luhn_check_digit(body: str) -> str:
    """The digit that makes ``body + digit`` pass the Luhn check (ISO/IEC 7812)."""
    total = 0
    for index, char in enumerate(reversed(body)):
        digit = int(char)
        if index % 2 == 0:      # doubled: these are the odd positions once the check is added
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return len(number) > 1 and number.isdigit() and luhn_check_digit(number[:-1]) == number[-1]


def add_months(moment: datetime, months: int) -> datetime:
    """Same day and time ``months`` later (or earlier), clamped to the month's last day."""
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


# --- parsing -----------------------------------------------------------------------------------


def _localized(raw: dict[str, Any], name: str, where: str) -> dict[str, str]:
    value = raw.get(name)
    if not isinstance(value, dict) or any(not isinstance(v, str) for v in value.values()):
        raise LoyaltyProgramError(f"{where}: '{name}' must be a table of language = text")
    missing = [loc for loc in LOCALES if not value.get(loc, "").strip()]
    if missing:
        raise LoyaltyProgramError(f"{where}: '{name}' lacks {', '.join(missing)}")
    return dict(value)


def _positive_int(raw: dict[str, Any], name: str, where: str, default: int | None = None) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoyaltyProgramError(f"{where}: '{name}' must be a positive whole number")
    return value


def _number_format(raw: Any) -> NumberFormat:
    where = "loyalty.member_number"
    if not isinstance(raw, dict):
        raise LoyaltyProgramError(f"{where}: missing table (prefix, length)")
    prefix = raw.get("prefix", "")
    if not isinstance(prefix, str) or not prefix.isdigit() or not prefix.isascii():
        raise LoyaltyProgramError(f"{where}: 'prefix' must be a string of digits")
    length = _positive_int(raw, "length", where)
    if length > 19:
        raise LoyaltyProgramError(f"{where}: 'length' must be at most 19 digits")
    fmt = NumberFormat(prefix, length)
    if fmt.random_digits < 6:
        raise LoyaltyProgramError(f"{where}: 'length' {length} leaves fewer than 6 random digits "
                                  f"after the {len(prefix)}-digit prefix and the check digit")
    return fmt


def _tiers(raw: Any) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise LoyaltyProgramError("loyalty.tiers: at least one [[loyalty.tiers]] is needed")
    tiers: list[Tier] = []
    for index, item in enumerate(raw):
        key = item.get("key") if isinstance(item, dict) else None
        where = f"loyalty tier '{key}'" if key else f"loyalty tier #{index + 1}"
        if not isinstance(key, str) or not key.isidentifier() or len(key) > 32:
            raise LoyaltyProgramError(f"{where}: 'key' must be a short identifier")
        if any(t.key == key for t in tiers):
            raise LoyaltyProgramError(f"{where}: duplicate key")
        threshold = item.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise LoyaltyProgramError(f"{where}: 'threshold' must be a whole number of points ≥ 0")
        if not tiers and threshold != 0:
            raise LoyaltyProgramError(f"{where}: the first tier must have threshold 0")
        if tiers and threshold <= tiers[-1].threshold:
            raise LoyaltyProgramError(f"{where}: thresholds must increase (previous tier "
                                      f"'{tiers[-1].key}' has {tiers[-1].threshold})")
        tiers.append(Tier(key, threshold, _localized(item, "name", where)))
    return tuple(tiers)


def parse_program(raw: Any) -> LoyaltyProgram:
    """Validate the ``[loyalty]`` table; every error names the field at fault."""
    if not isinstance(raw, dict):
        raise LoyaltyProgramError("loyalty: must be a table")
    expiry = raw.get("points_expire_after_months", "never")
    if expiry == "never":
        expiry_months: int | None = None
    else:
        expiry_months = _positive_int(raw, "points_expire_after_months", "loyalty")
    terms_raw = raw.get("terms")
    if not isinstance(terms_raw, dict):
        raise LoyaltyProgramError("loyalty.terms: missing table (version, text)")
    return LoyaltyProgram(
        names=_localized(raw, "name", "loyalty"),
        descriptions=_localized(raw, "description", "loyalty"),
        number=_number_format(raw.get("member_number")),
        tiers=_tiers(raw.get("tiers")),
        tier_window_months=_positive_int(raw, "tier_window_months", "loyalty", 12),
        expiry_months=expiry_months,
        terms=Terms(_positive_int(terms_raw, "version", "loyalty.terms"),
                    _localized(terms_raw, "text", "loyalty.terms")),
    )


def program_from_spec(spec: CatalogSpec) -> LoyaltyProgram | None:
    """The programme of a parsed catalog, or None when the catalog defines none."""
    raw = spec.extra.get("loyalty")
    return None if raw is None else parse_program(raw)


def load_program(path: str | Path) -> LoyaltyProgram | None:
    return program_from_spec(load_catalog_file(path))


# --- terms versions ----------------------------------------------------------------------------


def record_terms(session: Session, program: LoyaltyProgram) -> TopicWording:
    """Keep the programme's terms version as proof; safe to call at every start and enrollment.

    A version already recorded with another text is refused: members who accepted it must be
    able to see exactly what they accepted.
    """
    terms = program.terms
    row = session.scalars(select(TopicWording).where(
        TopicWording.topic_key == TERMS_KEY, TopicWording.version == terms.version)).first()
    if row is None:
        row = TopicWording(topic_key=TERMS_KEY, version=terms.version, texts=dict(terms.texts),
                           hash=terms.hash)
        session.add(row)
        session.flush()
    elif row.hash != terms.hash:
        raise LoyaltyProgramError(f"loyalty.terms: version {terms.version} was already recorded "
                                  "with another text; give the new text a new version")
    return row


def terms_version(session: Session, version: int) -> TopicWording | None:
    return session.scalars(select(TopicWording).where(
        TopicWording.topic_key == TERMS_KEY, TopicWording.version == version)).first()
