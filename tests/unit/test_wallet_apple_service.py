"""Apple Wallet cards as services: issuing, what the card shows, update tags, devices, the
feed consumer and the push outbox, against a real Session (SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from passes.apple import load_credentials, render_pass_json
from portal.core.db import utcnow
from portal.delivery.apns import PushOutcome, PushResult
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import load_program
from portal.models.customer import Customer
from portal.models.wallet import AppleDeviceRegistration, ApplePush, WalletNews
from portal.outbox import changes
from portal.services import wallet_apple as service
from portal.services import wallet_apple_sync as sync
from portal.services.consent import Proof
from tests.conftest import CATALOG
from tests.support.apple_wallet import (
    PASS_TYPE_ID,
    TEAM_ID,
    assert_valid_pass,
    dev_credentials,
    unpack,
)

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None
SETTINGS = service.CardSettings(PASS_TYPE_ID, TEAM_ID, "https://carnet.example", PROGRAM)
DEVICE_A, DEVICE_B = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "0f9e8d7c6b5a49382716f5e4d3c2b1a0"
TOKEN_A, TOKEN_B = "ab" * 32, "cd" * 32
_emails = itertools.count()


@pytest.fixture(scope="module")
def dev_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return dev_credentials(tmp_path_factory.mktemp("apple"))


def new_member(session: Session, email: str | None = None) -> Member:
    customer = Customer(public_id=f"cus_wallet_{next(_emails)}",
                        email=email or f"member{next(_emails)}@example.com", locale="en")
    session.add(customer)
    session.flush()
    return ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version,
                         Proof("portal", "test"))


def earn(session: Session, member: Member, points: int) -> None:
    ledger.earn(session, PROGRAM, member, points, reason="Order", actor="test")
    session.flush()


def test_a_member_is_issued_one_card_whose_serial_and_token_never_change(session):
    member = new_member(session)
    card = service.ensure_pass(session, member)
    assert len(card.serial_number) == 32 and len(card.authentication_token) >= 16
    assert card.update_tag >= 1
    again = service.ensure_pass(session, member)
    assert again.id == card.id
    assert (again.serial_number, again.authentication_token) == (card.serial_number,
                                                                 card.authentication_token)
    other = service.ensure_pass(session, new_member(session))
    assert other.serial_number != card.serial_number
    assert other.authentication_token != card.authentication_token


def test_authenticate_needs_the_card_token(session):
    card = service.ensure_pass(session, new_member(session))
    assert service.authenticate(session, card.serial_number, card.authentication_token) is card
    assert service.authenticate(session, card.serial_number, "x" * 43) is None
    assert service.authenticate(session, "0" * 32, card.authentication_token) is None


def test_the_card_shows_points_tier_next_tier_news_and_links_in_both_languages(
        session, dev_paths, tmp_path):
    member = new_member(session, "ines@example.com")
    earn(session, member, 1200)
    session.add(WalletNews(member_id=member.id, header="Old", body="Old news",
                           created_at=utcnow() - timedelta(days=1)))
    session.add(WalletNews(member_id=member.id, header="Double points",
                           body="Double points all weekend.",
                           locales={"fr": {"header": "Points doublés",
                                           "body": "Points doublés tout le week-end."}}))
    session.flush()
    card = service.card_for(session, member, SETTINGS)
    assert card.points == 1200 and card.member_number == member.member_number
    assert card.member_name == "ines@example.com"
    assert card.web_service_url == "https://carnet.example/wallet/apple"
    assert card.manage_url == "https://carnet.example/preferences"
    en, fr = card.strings["en"], card.strings["fr"]
    assert en[card.tier] == "Silver" and fr[card.tier] == "Argent"
    assert en["nextTier.value"] == "3,800 points to Gold"
    assert fr["nextTier.value"] == "3\u202f800 points avant Or"
    assert (en["news.header"], en["news.body"]) == ("Double points", "Double points all weekend.")
    assert fr["news.body"] == "Points doublés tout le week-end."
    assert fr["terms.value"] == PROGRAM.terms.text("fr")
    document = render_pass_json(card)
    assert document["authenticationToken"] == service.find_pass(
        session, member).authentication_token

    credentials = load_credentials(dev_paths["certificate"], dev_paths["private_key"],
                                   dev_paths["wwdr"])
    data, apple_pass = service.build_pkpass(session, member, SETTINGS, credentials)
    shipped = assert_valid_pass(data, dev_paths["ca_bundle"], tmp_path)
    assert shipped["serialNumber"] == apple_pass.serial_number
    assert shipped["storeCard"]["primaryFields"][0]["value"] == 1200
    assert "fr.lproj/pass.strings" in unpack(data)


def test_the_top_tier_says_so_instead_of_a_next_tier(session):
    member = new_member(session)
    earn(session, member, 6000)
    card = service.card_for(session, member, SETTINGS)
    assert card.strings["en"][card.tier] == "Gold"
    assert card.strings["en"]["nextTier.value"] == "Highest tier reached"


def test_a_change_advances_the_tag_and_last_modified_and_owes_each_device_one_push(session):
    member = new_member(session)
    card = service.ensure_pass(session, member)
    assert service.register_device(session, card, DEVICE_A, TOKEN_A) is True
    assert service.register_device(session, card, DEVICE_B, TOKEN_B) is True
    first_tag, first_modified = card.update_tag, service.last_modified(card)

    service.notify_pass_changed(session, member, "test")
    assert card.update_tag > first_tag
    assert service.last_modified(card) > first_modified  # even within the same second
    pushes = sync.pending_pushes(session, card)
    assert [p.tag for p in pushes] == [card.update_tag] * 2

    service.notify_pass_changed(session, member, "test again")
    pushes = sync.pending_pushes(session, card)
    assert len(pushes) == 2 and {p.tag for p in pushes} == {card.update_tag}


def test_a_member_without_a_card_is_left_alone(session):
    assert service.notify_pass_changed(session, new_member(session), "test") is None


def test_registration_is_created_once_and_keeps_the_latest_push_token(session):
    card = service.ensure_pass(session, new_member(session))
    assert service.register_device(session, card, DEVICE_A, TOKEN_A) is True
    assert service.register_device(session, card, DEVICE_A, TOKEN_B) is False
    [registration] = service.registrations(session, card)
    assert registration.push_token == TOKEN_B
    assert service.unregister_device(session, card, DEVICE_A) is True
    assert service.unregister_device(session, card, DEVICE_A) is False
    assert service.registrations(session, card) == []


def test_serials_updated_since_reports_each_update_once(session):
    member = new_member(session)
    card = service.ensure_pass(session, member)
    service.register_device(session, card, DEVICE_A, TOKEN_A)

    serials, tag = service.serials_updated_since(session, DEVICE_A, None)
    assert serials == [card.serial_number] and isinstance(tag, str)
    assert service.serials_updated_since(session, DEVICE_A, tag) is None
    assert service.serials_updated_since(session, DEVICE_B, None) is None

    service.notify_pass_changed(session, member, "test")
    serials, newer = service.serials_updated_since(session, DEVICE_A, tag)
    assert serials == [card.serial_number] and newer != tag
    assert service.serials_updated_since(session, DEVICE_A, newer) is None

    with pytest.raises(service.PassTagError):
        service.serials_updated_since(session, DEVICE_A, "yesterday")


def test_a_device_holding_two_cards_gets_only_the_changed_one(session):
    first, second = new_member(session), new_member(session)
    card_1, card_2 = service.ensure_pass(session, first), service.ensure_pass(session, second)
    service.register_device(session, card_1, DEVICE_A, TOKEN_A)
    service.register_device(session, card_2, DEVICE_A, TOKEN_A)
    _serials, tag = service.serials_updated_since(session, DEVICE_A, None)
    service.notify_pass_changed(session, first, "test")
    serials, _tag = service.serials_updated_since(session, DEVICE_A, tag)
    assert serials == [card_1.serial_number]


def test_the_feed_consumer_updates_cards_for_points_tier_and_address_changes(session):
    assert sync.follow_changes(session) == sync.Followed(False, 0)  # no card issued yet
    member = new_member(session)
    bystander = new_member(session)  # no card: its changes are read and skipped
    card = service.ensure_pass(session, member)
    service.register_device(session, card, DEVICE_A, TOKEN_A)
    session.flush()
    sync.follow_changes(session)  # whatever preceded the card
    tag = card.update_tag

    earn(session, member, 2000)  # points_changed + tier_changed
    earn(session, bystander, 10)
    followed = sync.follow_changes(session)
    assert followed.moved and followed.notified == 1
    session.refresh(card)
    assert card.update_tag > tag
    assert [p.tag for p in sync.pending_pushes(session, card)] == [card.update_tag]
    assert sync.follow_changes(session).notified == 0  # nothing new: nothing twice

    customer = session.get(Customer, member.customer_id)
    changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                               "fields": ["contact_pressure"]}, customer.id)
    assert sync.follow_changes(session).notified == 0  # not printed on the card
    changes.emit(session, "customer.updated", {"customer": customer.public_id,
                                               "fields": ["email"]}, customer.id)
    assert sync.follow_changes(session).notified == 1


def test_a_change_whose_data_cannot_be_read_does_not_hold_the_feed_back(session):
    """A poisoned change (``fields`` not a list) counts as touching the card; the cursor
    moves past it, and the changes after it still reach the other cards."""
    member, other = new_member(session), new_member(session)
    cards = [service.ensure_pass(session, m) for m in (member, other)]
    for card, device in zip(cards, (DEVICE_A, DEVICE_B), strict=True):
        service.register_device(session, card, device, TOKEN_A)
    session.flush()
    sync.follow_changes(session)
    customer = session.get(Customer, member.customer_id)
    changes.emit(session, "customer.updated", {"customer": customer.public_id, "fields": 5},
                 customer.id)
    earn(session, other, 10)
    followed = sync.follow_changes(session)
    assert followed.moved and followed.notified == 2
    assert sync.follow_changes(session) == sync.Followed(False, 0)


POLICY = sync.PushPolicy(base_seconds=30, max_attempts=3)


def queued(session: Session) -> tuple[Member, object]:
    member = new_member(session)
    card = service.ensure_pass(session, member)
    service.register_device(session, card, DEVICE_A, TOKEN_A)
    service.notify_pass_changed(session, member, "test")
    return member, card


def result(outcome: PushOutcome, status: int, reason: str | None = None) -> PushResult:
    return PushResult(TOKEN_A, outcome, status, reason)


def test_a_delivered_push_is_done_and_a_leased_one_is_not_claimed_twice(session):
    _member, card = queued(session)
    claimed = sync.claim_pushes(session, POLICY)
    assert [c.push_token for c in claimed] == [TOKEN_A]
    assert sync.claim_pushes(session, POLICY) == []  # leased
    summary = sync.record_push_results(session, claimed,
                                       [result(PushOutcome.DELIVERED, 200)], POLICY)
    assert summary.delivered == 1
    assert sync.pending_pushes(session, card) == []


def test_an_update_during_the_send_is_pushed_again(session):
    member, card = queued(session)
    claimed = sync.claim_pushes(session, POLICY)
    service.notify_pass_changed(session, member, "while sending")
    sync.record_push_results(session, claimed, [result(PushOutcome.DELIVERED, 200)], POLICY)
    [push] = sync.pending_pushes(session, card)
    assert push.tag == card.update_tag and push.leased_until is None
    assert len(sync.claim_pushes(session, POLICY)) == 1


def test_a_gone_device_is_unregistered(session):
    _member, card = queued(session)
    claimed = sync.claim_pushes(session, POLICY)
    summary = sync.record_push_results(session, claimed,
                                       [result(PushOutcome.GONE, 410, "Unregistered")], POLICY)
    assert summary.unregistered == 1
    assert service.registrations(session, card) == []
    assert session.scalars(select(ApplePush)).all() == []


def test_failures_back_off_exponentially_then_give_up(session):
    _member, card = queued(session)
    now = utcnow()
    delays = []
    for attempt in range(1, POLICY.max_attempts):
        claimed = sync.claim_pushes(session, POLICY, now=now)
        assert len(claimed) == 1, attempt
        sync.record_push_results(session, claimed, [result(PushOutcome.RETRY, 500)], POLICY,
                                 now=now)
        [push] = sync.pending_pushes(session, card)
        assert push.attempts == attempt and push.leased_until is None
        assert push.last_error == "500 retry"
        delays.append(push.next_attempt_at - now)
        assert sync.claim_pushes(session, POLICY, now=now) == []  # not due yet
        now = push.next_attempt_at
    assert timedelta(seconds=15) <= delays[0] <= timedelta(seconds=30)
    assert timedelta(seconds=30) <= delays[1] <= timedelta(seconds=60)
    claimed = sync.claim_pushes(session, POLICY, now=now)
    summary = sync.record_push_results(session, claimed, [result(PushOutcome.RETRY, 503)],
                                       POLICY, now=now)
    assert summary.dropped == 1 and sync.pending_pushes(session, card) == []
    assert len(service.registrations(session, card)) == 1  # the device stays registered


def test_a_new_change_does_not_cut_short_a_backoff(session):
    member, card = queued(session)
    claimed = sync.claim_pushes(session, POLICY)
    sync.record_push_results(session, claimed, [result(PushOutcome.RETRY, 429)], POLICY)
    [before] = sync.pending_pushes(session, card)
    service.notify_pass_changed(session, member, "again")
    [after] = sync.pending_pushes(session, card)
    assert after.tag == card.update_tag and after.next_attempt_at == before.next_attempt_at


def test_a_registration_that_changed_token_meanwhile_is_kept(session):
    _member, card = queued(session)
    claimed = sync.claim_pushes(session, POLICY)
    service.register_device(session, card, DEVICE_A, TOKEN_B)
    sync.record_push_results(session, claimed, [result(PushOutcome.GONE, 410)], POLICY)
    [registration] = session.scalars(select(AppleDeviceRegistration)).all()
    assert registration.push_token == TOKEN_B


def test_erasure_forgets_the_devices_holding_the_card(session, app):
    from portal.services.catalog import get_catalog
    from portal.services.privacy import erase_customer, hooks_of

    kept = service.ensure_pass(session, new_member(session))
    service.register_device(session, kept, DEVICE_B, TOKEN_B)
    member = new_member(session)
    card = service.ensure_pass(session, member)
    service.register_device(session, card, DEVICE_A, TOKEN_A)
    service.notify_pass_changed(session, member, "points")
    assert sync.pending_pushes(session, card)
    customer = session.get(Customer, member.customer_id)

    service.erase_devices(session, customer)
    assert service.registrations(session, card) == []
    assert sync.pending_pushes(session, card) == []
    # Someone else's phone is untouched.
    assert [r.device_library_identifier for r in service.registrations(session, kept)] == [
        DEVICE_B]
    # Deleting the account (the app wires the eraser in) does the same.
    other = new_member(session)
    other_card = service.ensure_pass(session, other)
    service.register_device(session, other_card, DEVICE_A, TOKEN_A)
    erase_customer(session, session.get(Customer, other.customer_id),
                   Proof("portal", "test"), get_catalog(session),
                   hooks_of(app.extensions).erasers)
    assert service.registrations(session, other_card) == []
