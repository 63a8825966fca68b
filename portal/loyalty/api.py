"""The loyalty programme for tills and order systems: enroll, read a member, post earns,
redeems and adjustments, reverse an entry (refund, return).

Writes to the ledger require an ``Idempotency-Key`` (see :mod:`portal.api.idempotent`): a till
that lost the answer retries with the same key and gets the original answer, and the points
move once. An earn also carries the order's ``source_ref``, which the ledger accepts once per
member whatever the key (409).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, current_app, g
from sqlalchemy.orm import Session

from portal.api import api
from portal.api.common import obj
from portal.api.core import bad_request, conflict, not_found, unprocessable
from portal.api.idempotent import (
    KeyHeaders,
    Outcome,
    Unkept,
    key_or_problem,
    outcome_of,
    run_once,
)
from portal.api.schema import DateTime, FieldError, Int, Obj, Str
from portal.core.db import begin_write, get_session, utcnow
from portal.loyalty import ledger
from portal.loyalty.models import LedgerEntry, Member
from portal.loyalty.program import LoyaltyProgram, add_months
from portal.models.customer import Customer
from portal.services import identity
from portal.services.consent import Proof

READ = ("decisions:read", "loyalty:write")
WRITE = ("loyalty:write",)
TAG = "Loyalty"
# A late till may send yesterday's sales; a date before this is a mistake, not a late sale.
OLDEST_OCCURRED_AT = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(minutes=5)   # clocks of tills drift

Enrollment = Obj({
    "customer": Str(min_length=1, max_length=40, description="Carnet customer id (cus_...)."),
    "terms_version": Int(minimum=1, maximum=1_000_000, description="The version of the "
                         "programme terms the customer accepted: must be the current one."),
}, required=("customer", "terms_version"), name="LoyaltyEnrollment")

Transaction = Obj({
    "type": Str(enum=("earn", "redeem", "adjust")),
    "points": Int(minimum=-ledger.MAX_POINTS, maximum=ledger.MAX_POINTS,
                  description="Positive for earn and redeem (a redeem takes them from the "
                  "balance); adjust is signed; never 0.", example=120),
    "reason": Str(min_length=1, max_length=200, example="Order 1042"),
    "source_ref": Str(min_length=1, max_length=120, description="The order number: required "
                      "for earn, and an order earns once per member (409).", example="1042"),
    "store": Str(min_length=1, max_length=64, nullable=True, example="Paris 11"),
    "occurred_at": DateTime(description="When the sale happened; default now. Points expire "
                            "counting from it."),
}, required=("type", "points", "reason"), name="LoyaltyTransaction", rules=(
    # Checked by _transaction_errors (codes zero, too_small, required).
    {"properties": {"points": {"not": {"const": 0}}}},
    {"if": {"properties": {"type": {"enum": ["earn", "redeem"]}}},
     "then": {"properties": {"points": {"minimum": 1}}}},
    {"if": {"properties": {"type": {"const": "earn"}}}, "then": {"required": ["source_ref"]}},
))

Reversal = Obj({"reason": Str(min_length=1, max_length=200, example="Refund of order 1042")},
               required=("reason",), name="LoyaltyReversal")

ENTRY = obj(id={"type": "integer"}, type={"enum": ["earn", "redeem", "adjust", "expire",
                                                     "reversal"]},
            points={"type": "integer"}, reason={"type": "string"},
            source_ref={"type": ["string", "null"]}, store={"type": ["string", "null"]},
            occurred_at={"type": "string", "format": "date-time"},
            recorded_at={"type": "string", "format": "date-time"},
            expires_at={"type": ["string", "null"], "format": "date-time"},
            reverses={"type": ["integer", "null"]})
MEMBER = obj(
    member_number={"type": "string"}, customer={"type": "string"},
    balance={"type": "integer"}, tier={"type": "string"},
    next_tier={"type": ["string", "null"]}, points_to_next_tier={"type": "integer"},
    earned_in_window={"type": "integer"},
    expiring_soon=obj(points={"type": "integer"}, within_days={"type": "integer"},
                      lots={"type": "array", "items": obj(
                          expires_at={"type": "string", "format": "date-time"},
                          points={"type": "integer"})}),
    terms_version={"type": "integer"}, enrolled_at={"type": "string", "format": "date-time"},
    left_at={"type": ["string", "null"], "format": "date-time"})
POSTED = obj(entry=ENTRY, member_number={"type": "string"}, balance={"type": "integer"},
             tier={"type": "string"})


# --- answers -----------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "type": entry.kind, "points": entry.points, "reason": entry.reason,
            "source_ref": entry.source_ref, "store": entry.store,
            "occurred_at": _iso(entry.occurred_at), "recorded_at": _iso(entry.recorded_at),
            "expires_at": _iso(entry.expires_at), "reverses": entry.reverses_id}


def member_json(session: Session, program: LoyaltyProgram, member: Member) -> dict[str, Any]:
    now = utcnow()
    active = member.left_at is None
    progress = ledger.progress(session, program, member, now) if active else None
    lots = ledger.expiring_soon(session, member, now) if active else []
    return {
        "member_number": member.member_number,
        "customer": _public_id(session, member),
        "balance": member.balance, "tier": member.tier,
        "next_tier": progress.next_tier.key if progress and progress.next_tier else None,
        "points_to_next_tier": progress.points_to_next if progress else 0,
        "earned_in_window": progress.earned if progress else 0,
        "expiring_soon": {"points": sum(points for _, points in lots),
                          "within_days": ledger.EXPIRING_SOON.days,
                          "lots": [{"expires_at": at.isoformat(), "points": points}
                                   for at, points in lots]},
        "terms_version": member.terms_version,
        "enrolled_at": _iso(member.enrolled_at), "left_at": _iso(member.left_at),
    }


def _public_id(session: Session, member: Member) -> str:
    customer = session.get(Customer, member.customer_id)
    return customer.public_id if customer is not None else ""


def _posted(member: Member, entry: LedgerEntry) -> Outcome:
    return 201, {"entry": entry_json(entry), "member_number": member.member_number,
                 "balance": member.balance, "tier": member.tier}


def _refused(exc: ledger.LoyaltyError) -> Response:
    """A ledger refusal as a problem: conflicts with the ledger's state are 409."""
    if isinstance(exc, ledger.DuplicateSourceRef):
        return conflict("duplicate-source-ref", str(exc), "source_ref")
    if isinstance(exc, ledger.AlreadyMember):
        return conflict("already-member", str(exc), "customer")
    if isinstance(exc, ledger.NotReversible):
        return conflict("already-reversed", str(exc), "entry_id")
    if isinstance(exc, ledger.NotAMember) and exc.field == "member":
        return conflict("membership-ended", str(exc), "member_number")
    if isinstance(exc, ledger.InsufficientPoints):
        return unprocessable("insufficient_points", str(exc), "points")
    return unprocessable(exc.code, str(exc), exc.field or "body")


def _program() -> LoyaltyProgram | None:
    from portal.loyalty.views import current_program

    return current_program(current_app._get_current_object())  # type: ignore[attr-defined]


def _actor() -> str:
    return f"api:{g.api_key.name}"


def _member(session: Session, program: LoyaltyProgram, number: str) -> Member | None:
    """A member by number; a number that fails the format or the Luhn check names nobody."""
    if not program.number.matches(number):
        return None
    return ledger.find_by_number(session, number)


NO_PROGRAMME = "the catalog defines no loyalty programme"


def key_problems(conflict_status: int, conflict_when: str, codes: str) -> dict[int, str]:
    """The problems of a ledger write under an Idempotency-Key."""
    return {400: "Also a missing or unusable Idempotency-Key.",
            404: "No such member or entry, or no loyalty programme.",
            conflict_status: conflict_when,
            422: f"Also {codes}; idempotency-key-reused: the key came with another request."}


# --- views -------------------------------------------------------------------------------------


@api.op("POST", "/loyalty/members", summary="Enroll a customer in the loyalty programme",
        tag=TAG, scopes=WRITE, body=Enrollment,
        responses={201: ("The new member.", MEMBER)},
        problems={404: "Unknown customer, or no loyalty programme.",
                  409: "Already a member.", 422: "Also terms_not_accepted."})
def enroll(body: dict[str, Any]) -> Any:
    """The customer accepted ``terms_version`` of the programme terms (recorded as proof).
    404 unknown customer; 409 already a member; 422 not the current terms version. A former
    member who comes back keeps their number, with a zero balance."""
    program = _program()
    if program is None:
        return not_found(NO_PROGRAMME)
    session = get_session()
    try:
        with begin_write(session):
            customer = identity.by_public_id(session, body["customer"])
            if customer is None:
                return not_found("no such customer", "customer")
            joined = ledger.enroll(session, program, customer, body["terms_version"],
                                   Proof("api", _actor()))
            answer = member_json(session, program, joined)
    except ledger.LoyaltyError as exc:
        return _refused(exc)
    return answer, 201, {"Location": f"/api/v1/loyalty/members/{joined.member_number}"}


@api.op("GET", "/loyalty/members/<member_number>", summary="A member: balance, tier, "
        "progress and points expiring soon", tag=TAG, scopes=READ,
        responses={200: ("The member.", MEMBER)})
def member(member_number: str) -> Any:
    program = _program()
    if program is None:
        return not_found(NO_PROGRAMME)
    session = get_session()
    with session.begin():
        found = _member(session, program, member_number)
        if found is None:
            return not_found("no member with this number", "member_number")
        return member_json(session, program, found)


def _transaction_errors(body: dict[str, Any], program: LoyaltyProgram) -> list[FieldError]:
    """Rules across fields, checked before the key is claimed (so they are not kept)."""
    errors: list[FieldError] = []
    kind, points = body["type"], body["points"]
    if points == 0:
        errors.append(FieldError("points", "zero", "must not be 0"))
    elif kind != "adjust" and points < 0:
        errors.append(FieldError("points", "too_small", f"{kind} takes a positive number"))
    if kind == "earn" and "source_ref" not in body:
        errors.append(FieldError("source_ref", "required", "is required for earn"))
    if not body["reason"].strip():
        errors.append(FieldError("reason", "blank", "must not be blank"))
    at, now = body.get("occurred_at"), utcnow()
    if at is not None:
        oldest = OLDEST_OCCURRED_AT
        if program.expiry_months is not None:   # earlier points would be born expired
            oldest = max(oldest, add_months(now, -program.expiry_months))
        if at > now + FUTURE_SLACK:
            errors.append(FieldError("occurred_at", "in_future", "must not be in the future"))
        elif at <= oldest:
            errors.append(FieldError("occurred_at", "too_old", "points from then would have "
                                     f"expired already (oldest {oldest.date().isoformat()})"))
    return errors


@api.op("POST", "/loyalty/members/<member_number>/transactions", summary="Earn, redeem or "
        "adjust points (Idempotency-Key required)", tag=TAG, scopes=WRITE, body=Transaction,
        headers=KeyHeaders, responses={201: ("The entry, the new balance and tier.", POSTED)},
        problems=key_problems(409, "The member already earned for this source_ref, or their "
                              "membership ended.", "insufficient_points, in_future, too_old, "
                              "blank"))
def transactions(member_number: str, body: dict[str, Any]) -> Any:
    """409 when the member already earned for ``source_ref`` (whatever the key); 422
    ``insufficient_points`` when a redeem exceeds the balance (nothing is written). Replays
    answer the original status and body with ``Idempotent-Replayed: true``."""
    key = key_or_problem()
    if isinstance(key, Response):
        return key
    program = _program()
    if program is None:
        return not_found(NO_PROGRAMME)
    errors = _transaction_errors(body, program)
    if errors:
        return bad_request(errors)

    def write(session: Session) -> Outcome:
        # Found and locked in one statement. No savepoint around the write: the ledger
        # refuses before it writes anything, so a refusal is kept like a success.
        target = (ledger.lock_by_number(session, member_number)
                  if program.number.matches(member_number) else None)
        if target is None:
            raise Unkept(not_found("no member with this number", "member_number"))
        try:
            entry = ledger.accrue(
                session, program, target, body["type"], body["points"],
                reason=body["reason"], actor=_actor(), source_ref=body.get("source_ref"),
                store=body.get("store"), occurred_at=body.get("occurred_at"))
        except ledger.LoyaltyError as exc:
            return outcome_of(_refused(exc))
        return _posted(target, entry)

    return run_once(key, write)


@api.op("POST", "/loyalty/transactions/<int:entry_id>/reverse", summary="Reverse an entry "
        "(refund, return; Idempotency-Key required)", tag=TAG, scopes=WRITE, body=Reversal,
        headers=KeyHeaders, responses={201: ("The reversal entry, the new balance and tier.",
                                             POSTED)},
        problems=key_problems(409, "The entry was already reversed.",
                              "not_reversible, blank"))
def reverse(entry_id: int, body: dict[str, Any]) -> Any:
    """Appends the exact opposite of an earn, redeem or adjust entry, once (409 when it was
    already reversed). Reversing a spent earn may leave the balance negative: the next
    credits pay that debt first."""
    key = key_or_problem()
    if isinstance(key, Response):
        return key
    program = _program()
    if program is None:
        return not_found(NO_PROGRAMME)
    if not body["reason"].strip():
        return bad_request([FieldError("reason", "blank", "must not be blank")])

    def write(session: Session) -> Outcome:
        original = session.get(LedgerEntry, entry_id) if entry_id < 2**63 else None
        if original is None:
            raise Unkept(not_found("no such entry", "entry_id"))
        if original.kind not in ("earn", "redeem", "adjust"):
            raise Unkept(unprocessable("not_reversible", f"{original.kind} entries cannot be "
                                       "reversed", "entry_id"))
        try:
            with session.begin_nested():
                reversal = ledger.reverse(session, program, original, reason=body["reason"],
                                          actor=_actor())
        except ledger.LoyaltyError as exc:
            return outcome_of(_refused(exc))
        target = session.get(Member, reversal.member_id)
        assert target is not None
        return _posted(target, reversal)

    return run_once(key, write)
