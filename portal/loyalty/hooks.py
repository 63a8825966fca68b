"""The loyalty programme's part of data export, erasure, the demo data and identity.

:func:`register_privacy` adds the export and erasure parts to the application's
:class:`~portal.services.privacy.PrivacyHooks` when the application is created, whether or
not today's catalog defines a programme: memberships, terms acceptances and the ledger stay in
the database when the ``[loyalty]`` table goes, and erasure must still reach them.
:func:`install` registers the demo data and identity hooks in ``services.demo`` and
``services.identity`` (member numbers name customers in the API) once the programme is
loaded. Registering again replaces the earlier hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.core.fast_rows import Reader
from portal.loyalty import ledger
from portal.loyalty.models import LedgerEntry, Member, TermsAcceptance
from portal.loyalty.program import LoyaltyProgram
from portal.models.customer import Customer
from portal.services import demo, identity
from portal.services.consent import Proof
from portal.services.privacy import PrivacyHooks

HOOK = "loyalty"


def export_member(session: Session, customer: Customer) -> dict[str, Any] | None:
    member = ledger.member_for(session, customer)
    if member is None:
        return None
    return {
        "member_number": member.member_number,
        "enrolled_at": member.enrolled_at.isoformat(),
        "left_at": member.left_at.isoformat() if member.left_at else None,
        "tier": member.tier,
        "balance": member.balance,
        "terms_accepted": [
            {"version": t.terms_version, "accepted_at": t.accepted_at.isoformat(),
             "source": t.source}
            for t in session.scalars(select(TermsAcceptance)
                                     .where(TermsAcceptance.member_id == member.id)
                                     .order_by(TermsAcceptance.id))
        ],
        "entries": [
            {"id": e.id, "kind": e.kind, "points": e.points, "reason": e.reason,
             "source_ref": e.source_ref, "store": e.store,
             "occurred_at": e.occurred_at.isoformat(),
             "expires_at": e.expires_at.isoformat() if e.expires_at else None,
             "reverses": e.reverses_id}
            for e in session.scalars(select(LedgerEntry).where(LedgerEntry.member_id == member.id)
                                     .order_by(LedgerEntry.id))
        ],
    }


def eraser(program: LoyaltyProgram | None) -> Callable[[Session, Customer], None]:
    """Erasure ends the membership (points forfeited) and drops the acceptance's IP and user
    agent. The ledger stays, pseudonymous, and the number stays taken for ever. Without a
    programme in the catalog the membership ends all the same (see ``loyalty.leave``)."""

    def erase_member(session: Session, customer: Customer) -> None:
        member = ledger.member_for(session, customer)
        if member is None:
            return
        if member.left_at is None:
            ledger.leave(session, program, member, actor="system:erasure")
        session.execute(update(TermsAcceptance).where(TermsAcceptance.member_id == member.id)
                        .values(ip=None, user_agent=None))

    return erase_member


def register_privacy(hooks: PrivacyHooks, program: LoyaltyProgram | None) -> None:
    """Memberships, terms acceptances and the ledger hold personal data: always registered."""
    hooks.add_exporter(HOOK, export_member)
    hooks.add_eraser(HOOK, eraser(program))


def demo_extra(program: LoyaltyProgram) -> Callable[[Session, Customer], None]:
    """The demo customer is a Silver member with a little history; a second run adds nothing."""

    def make_member(session: Session, customer: Customer) -> None:
        if session.scalar(select(Member.id).where(Member.customer_id == customer.id)):
            return
        now = utcnow()
        start = now - timedelta(days=715)   # the first points expire in about 15 days
        member = ledger.enroll(session, program, customer, program.terms.version,
                               Proof("import", "system:demo"), at=start)
        actor = "system:demo"
        for days, points, ref, store in [(0, 180, "DEMO-1001", "Paris 11"),
                                         (240, 320, "DEMO-1002", "Lyon Part-Dieu"),
                                         (560, 640, "DEMO-1003", None),
                                         (650, 420, "DEMO-1004", "Paris 11")]:
            at = start + timedelta(days=days)
            ledger.earn(session, program, member, points, reason=f"Order {ref}", actor=actor,
                        source_ref=ref, store=store, occurred_at=at, now=at)
        at = start + timedelta(days=600)
        ledger.redeem(session, program, member, 100, reason="Reward: tote bag", actor=actor,
                      store="Paris 11", occurred_at=at, now=at)
        ledger.adjust(session, program, member, 50, reason="Welcome gift", actor=actor,
                      now=now - timedelta(days=5))

    make_member.carnet_hook = HOOK  # type: ignore[attr-defined]
    return make_member


def customers_by_number(session: Reader, numbers: Sequence[str]) -> dict[str, int]:
    """Member number (as given; spaces and dashes of a printed card are ignored) -> customer
    id, for current members only: a number of someone who left, or was erased, names nobody."""
    wanted = {number: "".join(ch for ch in number if ch not in " -") for number in numbers}
    rows: dict[str, int] = {number: customer_id for number, customer_id in session.execute(
        select(Member.member_number, Member.customer_id).where(
            Member.member_number.in_(set(wanted.values())), Member.left_at.is_(None)))}
    return {given: rows[clean] for given, clean in wanted.items() if clean in rows}


def numbers_of(session: Session, customer_ids: Sequence[int]) -> dict[int, str]:
    """Customer id -> member number, for current members."""
    return {customer_id: number for customer_id, number in session.execute(
        select(Member.customer_id, Member.member_number).where(
            Member.customer_id.in_(customer_ids), Member.left_at.is_(None)))}


def _replace(hooks: list[Any], hook: Any) -> None:
    hooks[:] = [h for h in hooks if getattr(h, "carnet_hook", None) != HOOK]
    hooks.append(hook)


def install(program: LoyaltyProgram) -> None:
    _replace(demo.EXTRAS, demo_extra(program))
    identity.member_numbers.find = customers_by_number
    identity.member_numbers.of = numbers_of
