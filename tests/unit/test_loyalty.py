"""The loyalty ledger: numbers, balances, FIFO expiry, tiers, reversals, events, triggers and
concurrency, on SQLite and (with CARNET_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from portal.core.db import make_engine
from portal.loyalty import hooks as loyalty_hooks
from portal.loyalty import ledger
from portal.loyalty.jobs import expire_points, recompute_tiers
from portal.loyalty.models import LedgerEntry, Lot, LotAllocation, Member, TermsAcceptance
from portal.loyalty.program import (
    TERMS_KEY,
    LoyaltyProgramError,
    NumberFormat,
    add_months,
    load_program,
    luhn_check_digit,
    luhn_valid,
    parse_program,
    record_terms,
)
from portal.models.catalog import TopicWording
from portal.models.consent import ConsentEvent
from portal.outbox.models import Change
from portal.services import idempotency, privacy
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof
from tests.conftest import CATALOG, prepare_schema
from tests.support.databases import PG_URL, fresh_database

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
PROOF = Proof("portal", "customer:test", "203.0.113.9", "pytest")
T0 = datetime(2024, 1, 15, 12, 0, tzinfo=UTC)
_emails = count()


def new_member(session: Session, at: datetime = T0) -> Member:
    customer = create_customer(session, f"member{next(_emails)}@example.com", source="import")
    return ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version, PROOF, at=at)


def earn(session: Session, member: Member, points: int, at: datetime, ref: str | None = None
         ) -> LedgerEntry:
    return ledger.earn(session, PROGRAM, member, points, reason=f"Order {ref or points}",
                       actor="store:test", source_ref=ref, now=at)


def healthy(session: Session, member: Member) -> None:
    session.flush()
    assert ledger.check_member(session, member) == []


def feed(session: Session, type_: str, member: Member) -> list[dict]:
    return [c.data for c in session.scalars(
        select(Change).where(Change.type == type_, Change.customer_id == member.customer_id)
        .order_by(Change.id))]


# --- programme definition ----------------------------------------------------------------------


def test_luhn_check_digit_matches_the_reference_example():
    assert luhn_check_digit("7992739871") == "3"
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_add_months_clamps_to_the_end_of_the_month():
    assert add_months(datetime(2024, 1, 31, tzinfo=UTC), 1) == datetime(2024, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2024, 3, 15, tzinfo=UTC), -12) == datetime(2023, 3, 15, tzinfo=UTC)


@pytest.mark.parametrize("patch, message", [
    ({"tiers": []}, "at least one"),
    ({"tier_window_months": 0}, "'tier_window_months' must be a positive"),
    ({"points_expire_after_months": "soon"}, "'points_expire_after_months'"),
    ({"member_number": {"prefix": "27a8", "length": 12}}, "'prefix' must be a string of digits"),
    ({"member_number": {"prefix": "2718", "length": 9}}, "fewer than 6 random digits"),
    ({"terms": {"version": 1, "text": {"en": "Only English"}}}, "'text' lacks fr"),
    ({"name": {"en": "X"}}, "loyalty: 'name' lacks fr"),
])
def test_programme_errors_name_the_field(patch, message):
    raw = {**_raw(), **patch}
    with pytest.raises(LoyaltyProgramError, match=message):
        parse_program(raw)


def test_tier_thresholds_must_start_at_zero_and_increase():
    raw = _raw()
    raw["tiers"] = [dict(t) for t in raw["tiers"]]
    raw["tiers"][2]["threshold"] = 1000
    with pytest.raises(LoyaltyProgramError, match="tier 'gold': thresholds must increase"):
        parse_program(raw)
    raw["tiers"][0]["threshold"] = 5
    with pytest.raises(LoyaltyProgramError, match="first tier must have threshold 0"):
        parse_program(raw)


def test_points_can_be_made_to_never_expire():
    program = parse_program({**_raw(), "points_expire_after_months": "never"})
    assert program.expiry_months is None and program.expires_at(T0) is None


def _raw() -> dict:
    from portal.services.catalog import load_catalog_file

    return dict(load_catalog_file(CATALOG).extra["loyalty"])


def test_terms_versions_are_recorded_and_a_silent_rewording_is_refused(session):
    row = record_terms(session, PROGRAM)
    assert (row.topic_key, row.version) == (TERMS_KEY, PROGRAM.terms.version)
    reworded = parse_program({**_raw(), "terms": {"version": PROGRAM.terms.version,
                                                  "text": {"en": "New", "fr": "Nouveau"}}})
    with pytest.raises(LoyaltyProgramError, match="already recorded with another text"):
        record_terms(session, reworded)


# --- enrollment and member numbers -------------------------------------------------------------


def test_member_numbers_are_luhn_valid_formatted_and_unique(session):
    numbers = [new_member(session).member_number for _ in range(25)]
    assert len(set(numbers)) == 25
    for number in numbers:
        assert PROGRAM.number.matches(number), number
        assert luhn_valid(number)


def test_a_number_is_never_reused_after_its_member_left(session, monkeypatch):
    first = new_member(session)
    ledger.leave(session, PROGRAM, first, actor="customer:test")
    fresh = iter([first.member_number, first.member_number, "271800000009"])
    monkeypatch.setattr(NumberFormat, "generate", lambda self: next(fresh))
    second = new_member(session)
    assert second.member_number == "271800000009" != first.member_number
    # The former member comes back with their own number, and nobody else's.
    customer = first.customer_id
    ledger.enroll(session, PROGRAM, session.get(ledger.Customer, customer),
                  PROGRAM.terms.version, PROOF)
    assert first.member_number != second.member_number and first.left_at is None


def test_joining_records_the_terms_but_grants_no_marketing_consent(session):
    member = new_member(session)
    acceptance = session.scalars(select(TermsAcceptance)
                                 .where(TermsAcceptance.member_id == member.id)).one()
    wording = session.scalars(select(TopicWording).where(
        TopicWording.topic_key == TERMS_KEY, TopicWording.version == PROGRAM.terms.version)).one()
    assert acceptance.terms_hash == wording.hash and acceptance.ip == "203.0.113.9"
    assert session.scalar(select(func.count()).select_from(ConsentEvent).where(
        ConsentEvent.customer_id == member.customer_id)) == 0
    assert feed(session, "loyalty.enrolled", member)[0]["member_number"] == member.member_number
    with pytest.raises(ledger.AlreadyMember):
        ledger.enroll(session, PROGRAM, session.get(ledger.Customer, member.customer_id),
                      PROGRAM.terms.version, PROOF)


def test_joining_needs_the_current_terms(session):
    customer = create_customer(session, "old-terms@example.com", source="import")
    with pytest.raises(ledger.TermsNotAccepted):
        ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version + 1, PROOF)
    assert ledger.member_for(session, customer) is None


# --- ledger ------------------------------------------------------------------------------------


def test_balance_is_the_ledger_sum_after_every_operation(session):
    member = new_member(session)
    at = T0 + timedelta(days=1)
    steps = [
        lambda: earn(session, member, 500, at, "A-1"),
        lambda: earn(session, member, 300, at + timedelta(days=1), "A-2"),
        lambda: ledger.redeem(session, PROGRAM, member, 650, reason="Reward", actor="t",
                              now=at + timedelta(days=2)),
        lambda: ledger.adjust(session, PROGRAM, member, -50, reason="Fix", actor="t",
                              now=at + timedelta(days=3)),
        lambda: ledger.adjust(session, PROGRAM, member, 75, reason="Gift", actor="t",
                              now=at + timedelta(days=3)),
    ]
    for step in steps:
        step()
        healthy(session, member)
    assert member.balance == 500 + 300 - 650 - 50 + 75
    assert member.lifetime_earned == 800 and member.lifetime_redeemed == 650


def test_an_overdraft_is_refused_and_nothing_is_written(session):
    member = new_member(session)
    earn(session, member, 100, T0, "B-1")                     # expired by the time of the redeem
    earn(session, member, 200, T0 + timedelta(days=400), "B-2")
    session.flush()
    entries = session.scalar(select(func.count()).select_from(LedgerEntry))
    changes_before = session.scalar(select(func.count()).select_from(Change))
    with pytest.raises(ledger.InsufficientPoints) as caught:
        ledger.redeem(session, PROGRAM, member, 250, reason="Too much", actor="t",
                      now=add_months(T0, 25))
    assert (caught.value.balance, caught.value.requested) == (200, 250)
    session.flush()
    assert session.scalar(select(func.count()).select_from(LedgerEntry)) == entries
    assert session.scalar(select(func.count()).select_from(Change)) == changes_before
    assert member.balance == 300
    healthy(session, member)


def test_an_order_earns_once_per_member(session):
    member, other = new_member(session), new_member(session)
    first = earn(session, member, 120, T0, "ORDER-9")
    with pytest.raises(ledger.DuplicateSourceRef) as caught:
        earn(session, member, 120, T0, "ORDER-9")
    assert caught.value.entry.id == first.id and caught.value.code == "duplicate_source_ref"
    earn(session, other, 120, T0, "ORDER-9")
    assert member.balance == 120 and other.balance == 120


def test_fifo_expiry_consumes_the_oldest_lots_and_a_second_run_changes_nothing(session):
    member = new_member(session)
    oldest = earn(session, member, 100, T0, "F-1")
    middle = earn(session, member, 200, T0 + timedelta(days=30), "F-2")
    newest = earn(session, member, 300, T0 + timedelta(days=200), "F-3")
    redeem = ledger.redeem(session, PROGRAM, member, 150, reason="Reward", actor="t",
                           now=T0 + timedelta(days=210))
    taken = dict(session.execute(select(LotAllocation.lot_id, LotAllocation.points)
                                 .where(LotAllocation.entry_id == redeem.id)).all())
    assert taken == {oldest.id: 100, middle.id: 50}

    now = add_months(T0 + timedelta(days=30), 24) + timedelta(hours=1)
    report = expire_points(session, now)
    session.expire_all()
    assert (report.members, report.lots, report.points) == (1, 1, 150)
    assert member.balance == 300
    assert session.get(Lot, newest.id).remaining == 300
    assert feed(session, "loyalty.points_changed", member)[-1]["delta"] == -150
    healthy(session, member)

    entries = session.scalar(select(func.count()).select_from(LedgerEntry))
    changes_before = session.scalar(select(func.count()).select_from(Change))
    again = expire_points(session, now)
    assert (again.members, again.lots, again.points) == (0, 0, 0)
    assert session.scalar(select(func.count()).select_from(LedgerEntry)) == entries
    assert session.scalar(select(func.count()).select_from(Change)) == changes_before


def test_expiry_in_small_batches_covers_every_member(session):
    members = [new_member(session) for _ in range(5)]
    for index, member in enumerate(members):
        earn(session, member, 10 * (index + 1), T0, f"E-{index}")
    report = expire_points(session, add_months(T0, 25), batch_size=2,
                           member_ids=[m.id for m in members])
    session.expire_all()
    assert report.points == 150 and all(m.balance == 0 for m in members)
    for member in members:
        healthy(session, member)


def test_points_spent_are_never_the_expired_ones(session):
    member = new_member(session)
    earn(session, member, 100, T0, "X-1")
    earn(session, member, 100, T0 + timedelta(days=500), "X-2")
    ledger.redeem(session, PROGRAM, member, 60, reason="Reward", actor="t",
                  now=add_months(T0, 24) + timedelta(days=1))
    assert member.balance == 40
    kinds = [e.kind for e in ledger.entries(session, member)]
    assert kinds[:2] == ["redeem", "expire"]
    healthy(session, member)


# --- tiers -------------------------------------------------------------------------------------


def test_tiers_follow_points_earned_in_the_window_not_the_balance(session):
    member = new_member(session)
    earn(session, member, 1000, T0, "T-1")
    assert member.tier == "silver"
    ledger.redeem(session, PROGRAM, member, 900, reason="Reward", actor="t", now=T0)
    assert member.tier == "silver"                          # spending keeps the tier
    earn(session, member, 4000, T0 + timedelta(days=300), "T-2")
    assert member.tier == "gold"
    progress = ledger.progress(session, PROGRAM, member, T0 + timedelta(days=300))
    assert (progress.tier.key, progress.next_tier, progress.points_to_next) == ("gold", None, 0)
    tiers = feed(session, "loyalty.tier_changed", member)
    assert [(t["previous_tier"], t["tier"]) for t in tiers] == [("bronze", "silver"),
                                                                 ("silver", "gold")]
    # The first earn leaves the window: Gold needs 5,000 in 12 months, 4,000 remain.
    report = recompute_tiers(session, PROGRAM, add_months(T0, 12) + timedelta(days=1))
    session.expire_all()
    assert report.changed == {"gold->silver": 1} and member.tier == "silver"
    assert feed(session, "loyalty.tier_changed", member)[-1]["tier"] == "silver"
    recompute_tiers(session, PROGRAM, add_months(T0 + timedelta(days=300), 12) + timedelta(days=1))
    session.expire_all()
    assert member.tier == "bronze"
    again = recompute_tiers(session, PROGRAM,
                            add_months(T0 + timedelta(days=300), 12) + timedelta(days=1))
    assert again.changed == {}


def test_progress_says_how_many_points_to_the_next_tier(session):
    member = new_member(session)
    earn(session, member, 4550, T0, "P-1")
    progress = ledger.progress(session, PROGRAM, member, T0)
    assert (progress.tier.key, progress.next_tier.key) == ("silver", "gold")
    assert progress.points_to_next == 450 and progress.percent == 88


# --- reversals ---------------------------------------------------------------------------------


def test_reversing_a_spent_earn_leaves_a_debt_the_next_earn_pays(session):
    member = new_member(session)
    earn(session, member, 200, T0, "R-1")
    refunded = earn(session, member, 100, T0, "R-2")
    ledger.redeem(session, PROGRAM, member, 250, reason="Reward", actor="t", now=T0)
    reversal = ledger.reverse(session, PROGRAM, refunded, reason="Order R-2 refunded",
                              actor="t", now=T0 + timedelta(days=1))
    assert reversal.points == -100 and reversal.reverses_id == refunded.id
    assert member.balance == -50 and member.lifetime_earned == 200
    healthy(session, member)
    earn(session, member, 80, T0 + timedelta(days=2), "R-3")
    assert member.balance == 30
    healthy(session, member)
    with pytest.raises(ledger.NotReversible):
        ledger.reverse(session, PROGRAM, refunded, reason="twice", actor="t")
    with pytest.raises(ledger.NotReversible):
        ledger.reverse(session, PROGRAM, reversal, reason="undo", actor="t")


def test_reversing_a_redeem_gives_the_points_back_to_their_lots(session):
    member = new_member(session)
    first = earn(session, member, 100, T0, "S-1")
    earn(session, member, 100, T0 + timedelta(days=10), "S-2")
    reward = ledger.redeem(session, PROGRAM, member, 150, reason="Reward", actor="t",
                           now=T0 + timedelta(days=20))
    ledger.reverse(session, PROGRAM, reward, reason="Reward cancelled", actor="t",
                   now=T0 + timedelta(days=21))
    assert member.balance == 200 and member.lifetime_redeemed == 0
    assert session.get(Lot, first.id).remaining == 100
    healthy(session, member)


def _true_state(session: Session, member: Member, now: datetime) -> tuple[int, datetime]:
    """Earned in the window and the earliest open lot expiry, read from the ledger."""
    session.flush()
    earned = ledger.earned_in_window(session, PROGRAM, [member.id], now)[member.id]
    soonest = session.scalar(select(func.min(Lot.expires_at)).where(
        Lot.member_id == member.id, Lot.remaining > 0))
    return earned, soonest or ledger.NO_EXPIRY


@pytest.mark.parametrize("seed", range(4))
def test_cached_expiry_and_window_agree_with_the_ledger(session, seed):
    """Accruals skip the ledger reads while the member's caches say nothing is due and the
    window count is exact: over a long random history (back-dated and future-dated earns,
    refunds, overdrafts, expiry, the nightly jobs, leaving and coming back), every write
    still expires what is due first and lands on the tier the ledger gives."""
    import random

    rng = random.Random(seed)
    member = new_member(session)
    now = T0
    posted: list[LedgerEntry] = []
    for step in range(120):
        now += timedelta(days=rng.choice([0, 1, 5, 20, 45, 90]), minutes=rng.randint(0, 600))
        roll = rng.random()
        try:
            if roll < 0.45:
                occurred = now - timedelta(days=rng.choice([0, 0, 3, 40, 200]))
                if rng.random() < 0.1:
                    occurred = now + timedelta(minutes=3)        # a till's clock ahead
                ref = f"Q-{seed}-{rng.randint(0, step)}"           # sometimes a repeat
                posted.append(ledger.earn(session, PROGRAM, member, rng.randint(1, 2500),
                                          reason="Order", actor="t", source_ref=ref,
                                          occurred_at=occurred, now=now))
            elif roll < 0.65:
                posted.append(ledger.redeem(session, PROGRAM, member, rng.randint(1, 1500),
                                            reason="Reward", actor="t", now=now))
            elif roll < 0.75:
                posted.append(ledger.adjust(session, PROGRAM, member,
                                            rng.choice([-1, 1]) * rng.randint(1, 500),
                                            reason="Goodwill", actor="t", now=now))
            elif roll < 0.87 and posted:
                ledger.reverse(session, PROGRAM, rng.choice(posted), reason="Refund",
                               actor="t", now=now)
            elif roll < 0.95:
                expire_points(session, now)
                recompute_tiers(session, PROGRAM, now)
                session.expire_all()
                continue
            else:
                ledger.leave(session, PROGRAM, member, actor="t", at=now)
                customer = session.get(ledger.Customer, member.customer_id)
                member = ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version,
                                       PROOF, at=now)
                continue
        except (ledger.InsufficientPoints, ledger.DuplicateSourceRef, ledger.NotReversible):
            healthy(session, member)        # a refusal writes nothing, not even an expiry
            continue
        earned, soonest = _true_state(session, member, now)
        assert member.tier == PROGRAM.tier_for(earned).key, (step, earned)
        assert member.next_expiry_at is None or member.next_expiry_at <= soonest, step
        assert soonest > now, step                        # nothing past due stays open
        healthy(session, member)


# --- leaving, events, privacy, idempotency -----------------------------------------------------


def test_leaving_forfeits_points_and_coming_back_starts_afresh(session):
    member = new_member(session)
    earn(session, member, 1500, T0, "L-1")
    ledger.leave(session, PROGRAM, member, actor="customer:test", at=T0 + timedelta(days=1))
    assert member.balance == 0 and member.left_at is not None and member.tier == "bronze"
    forfeit = ledger.entries(session, member)[0]
    assert (forfeit.kind, forfeit.points) == ("expire", -1500)
    healthy(session, member)
    with pytest.raises(ledger.NotAMember):
        earn(session, member, 10, T0 + timedelta(days=2), "L-2")
    customer = session.get(ledger.Customer, member.customer_id)
    number = member.member_number
    back = ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version, PROOF,
                         at=T0 + timedelta(days=3))
    assert back.id == member.id and back.member_number == number
    earn(session, back, 10, T0 + timedelta(days=4), "L-3")
    assert back.tier == "bronze"         # the 1,500 earned before leaving no longer count


def test_every_write_emits_points_changed_for_the_wallet(session):
    member = new_member(session)
    entry = earn(session, member, 1200, T0, "W-1")
    data = feed(session, "loyalty.points_changed", member)[-1]
    assert data["member_number"] == member.member_number
    assert (data["balance"], data["tier"], data["delta"], data["entry_id"]) == (
        1200, "silver", 1200, entry.id)
    tier = feed(session, "loyalty.tier_changed", member)[-1]
    assert (tier["tier"], tier["balance"], tier["delta"]) == ("silver", 1200, 1200)


def test_ledger_rows_cannot_be_updated_or_deleted(session):
    member = new_member(session)
    earn(session, member, 100, T0, "AO-1")
    ledger.redeem(session, PROGRAM, member, 40, reason="Reward", actor="t", now=T0)
    session.flush()
    for sql in ("UPDATE loyalty_ledger SET points = 1000",
                "DELETE FROM loyalty_ledger",
                "UPDATE loyalty_lot_allocations SET points = 0",
                "DELETE FROM loyalty_lot_allocations"):
        with pytest.raises(Exception, match="append-only"), session.begin_nested():
            session.execute(text(sql))
    assert member.balance == 60
    healthy(session, member)


def test_export_and_erasure_include_the_membership(session):
    hooks = privacy.PrivacyHooks()
    loyalty_hooks.register_privacy(hooks, PROGRAM)
    member = new_member(session)
    earn(session, member, 300, T0, "G-1")
    customer = session.get(ledger.Customer, member.customer_id)
    exported = privacy.export_data(session, customer, get_catalog(session),
                                   hooks.exporters)["loyalty"]
    assert exported["member_number"] == member.member_number and exported["balance"] == 300
    assert [e["source_ref"] for e in exported["entries"]] == ["G-1"]
    privacy.erase_customer(session, customer, Proof("portal", "customer:test"),
                           get_catalog(session), hooks.erasers)
    session.expire_all()
    assert member.left_at is not None and member.balance == 0
    acceptance = session.scalars(select(TermsAcceptance)
                                 .where(TermsAcceptance.member_id == member.id)).one()
    assert acceptance.ip is None and acceptance.user_agent is None


def test_demo_customer_is_a_member_once(session):
    from portal.services.demo import ensure_demo

    loyalty_hooks.install(PROGRAM)
    customer, _ = ensure_demo(session)
    member = ledger.member_for(session, customer)
    assert member is not None and member.tier == "silver" and member.balance > 0
    entries = len(ledger.entries(session, member))
    ensure_demo(session)
    assert len(ledger.entries(session, member)) == entries
    assert ledger.expiring_soon(session, member)
    healthy(session, member)


def test_idempotency_replays_the_same_request_and_refuses_another(session):
    fp = idempotency.fingerprint("POST", "/api/v1/loyalty/x/entries", b'{"points": 5}')
    assert idempotency.replay(session, "key_1", "k-1", fp) is None
    idempotency.remember(session, "key_1", "k-1", fp, 201, {"balance": 5})
    assert idempotency.replay(session, "key_1", "k-1", fp).body == {"balance": 5}
    other = idempotency.fingerprint("POST", "/api/v1/loyalty/x/entries", b'{"points": 6}')
    with pytest.raises(idempotency.IdempotencyConflict):
        idempotency.replay(session, "key_1", "k-1", other)
    assert idempotency.replay(session, "key_2", "k-1", other) is None


# --- concurrency (PostgreSQL, real commits) ----------------------------------------------------


@pytest.mark.skipif(not PG_URL, reason="needs CARNET_TEST_DATABASE_URL (PostgreSQL)")
def test_concurrent_accruals_and_redeems_lose_nothing(tmp_path):
    with fresh_database("postgresql", tmp_path) as url:
        engine = make_engine(url, pool_size=12)
        try:
            prepare_schema(engine)
            with Session(engine, expire_on_commit=False) as s, s.begin():
                member = new_member(s, at=datetime.now(UTC) - timedelta(days=1))
                earn(s, member, 1000, datetime.now(UTC), "SEED")
            member_id = member.id
            errors: list[BaseException] = []
            overdrafts = []

            def work(worker: int) -> None:
                try:
                    for i in range(15):
                        with Session(engine, expire_on_commit=False) as s, s.begin():
                            m = s.get(Member, member_id)
                            ledger.earn(s, PROGRAM, m, 7, reason="Order", actor="t",
                                        source_ref=f"C-{worker}-{i}")
                        with Session(engine, expire_on_commit=False) as s:
                            try:
                                with s.begin():
                                    m = s.get(Member, member_id)
                                    ledger.redeem(s, PROGRAM, m, 90, reason="Reward", actor="t")
                            except ledger.InsufficientPoints:
                                overdrafts.append(worker)
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == []
            with Session(engine) as s:
                m = s.get(Member, member_id)
                redeems = s.scalar(select(func.count()).select_from(LedgerEntry).where(
                    LedgerEntry.member_id == member_id, LedgerEntry.kind == "redeem"))
                assert redeems + len(overdrafts) == 8 * 15
                assert m.balance == 1000 + 8 * 15 * 7 - 90 * redeems
                assert m.balance >= 0
                assert ledger.check_member(s, m) == []
        finally:
            engine.dispose()
