"""The Google Wallet card service against a real Session: plain data for the card, the signed
save link, the change-feed consumer, the notification quota and the ``wallet`` contacts."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from passes.google import GoogleWalletValidationError, object_id_for
from passes.google_dev import DEFAULT_DEV_CLIENT_EMAIL, create_dev_service_account
from portal.core.db import utcnow
from portal.loyalty.ledger import leave
from portal.loyalty.models import Member
from portal.models.customer import Customer
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject, WalletFeedCursor
from portal.services import wallet_google, wallet_messages
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.decisions import CONTACT_RESOLVERS, decide_many
from tests.support.wallet_google import (
    ISSUER,
    PROGRAM,
    decode_save_link,
    earn,
    new_member,
    settings,
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return create_dev_service_account(tmp_path / "sa.json", token_uri="http://127.0.0.1:9/t")


def test_card_data_comes_from_the_programme_and_the_ledger_in_the_members_language(
        session: Session, key_file: Path):
    member = new_member(session, locale="fr", email="lea@example.com")
    earn(session, member, 1250)
    card = wallet_google.member_data(session, PROGRAM, member, settings(key_file))
    assert card.member.member_number == member.member_number
    assert card.member.account_name == "lea@example.com"
    assert card.points == 1250
    assert card.tier == "Argent"                                    # French tier name
    assert card.member.next_tier_text == "Encore 3\u202f750 points pour atteindre le statut Or"
    assert card.member.manage_preferences_url == "https://carnet.example/preferences"
    assert card.state == "ACTIVE"

    program = wallet_google.program_data(PROGRAM, settings(key_file))
    assert program.class_id == f"{ISSUER}.carnet-rewards"
    assert program.localized_program_name == {"en": "Carnet Rewards", "fr": "Carnet Fidélité"}
    assert program.program_logo_uri.startswith("https://carnet.example/static/img/")


def test_a_negative_balance_shows_zero_and_a_former_member_an_inactive_card(
        session: Session, key_file: Path):
    member = new_member(session)
    earn(session, member, 30)
    leave(session, PROGRAM, member, actor="test")
    card = wallet_google.member_data(session, PROGRAM, member, settings(key_file))
    assert card.points == 0 and card.state == "INACTIVE" and card.member.next_tier_text == ""
    member.balance = -40        # a refund after the points were spent
    assert wallet_google.member_data(session, PROGRAM, member, settings(key_file)).points == 0


def test_save_link_is_signed_by_the_service_account_and_embeds_the_members_card(
        session: Session, key_file: Path):
    member = new_member(session, email="noa@example.com")
    earn(session, member, 420)
    before = int(time.time())
    link = wallet_google.save_link(session, PROGRAM, member, settings(key_file))

    _, claims = decode_save_link(link, key_file)
    assert claims["iss"] == DEFAULT_DEV_CLIENT_EMAIL
    assert claims["aud"] == "google" and claims["typ"] == "savetowallet"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["origins"] == ["https://carnet.example"]
    [obj] = claims["payload"]["loyaltyObjects"]
    [cls] = claims["payload"]["loyaltyClasses"]
    assert obj["id"] == object_id_for(ISSUER, member.member_number)
    assert obj["classId"] == cls["id"] == f"{ISSUER}.carnet-rewards"
    assert obj["state"] == "ACTIVE"
    assert obj["accountId"] == member.member_number and obj["accountName"] == "noa@example.com"
    assert obj["loyaltyPoints"]["balance"] == {"int": 420}
    assert obj["secondaryLoyaltyPoints"]["balance"] == {"string": "Bronze"}
    assert obj["barcode"] == {"type": "QR_CODE", "value": member.member_number,
                              "alternateText": member.member_number}
    assert cls["programName"] == "Carnet Rewards" and cls["issuerName"] == "Carnet"

    # Issuing the link records the card, in sync with what the link shows.
    row = wallet_google.card_for(session, member)
    assert row is not None and row.object_id == obj["id"]
    assert (row.synced_points, row.synced_tier, row.synced_state) == (420, "Bronze", "ACTIVE")
    assert row.pending_change_id is None and row.saved_at is None
    wallet_google.save_link(session, PROGRAM, member, settings(key_file))
    assert len(session.scalars(select(GoogleWalletObject).where(
        GoogleWalletObject.member_id == member.id)).all()) == 1


def test_save_link_refuses_an_origin_that_is_not_one(session: Session, key_file: Path):
    member = new_member(session)
    bad = settings(key_file, base_url="https://carnet.example")
    bad = wallet_google.GoogleSettings(**{**bad.__dict__, "origins": ("carnet.example/x",)})
    with pytest.raises(GoogleWalletValidationError, match="origin"):
        wallet_google.save_link(session, PROGRAM, member, bad)


def test_feed_consumer_marks_cards_once_and_keeps_its_cursor(session: Session, key_file: Path):
    with_card, without_card = new_member(session), new_member(session)
    wallet_google.save_link(session, PROGRAM, with_card, settings(key_file))
    wallet_google.mark_pending_from_feed(session)      # history before now: nothing pending
    card = wallet_google.card_for(session, with_card)
    assert card is not None
    card.pending_change_id = None

    earn(session, with_card, 10)
    earn(session, without_card, 10)
    earn(session, with_card, 20)
    assert wallet_google.mark_pending_from_feed(session) == 1
    assert card.pending_change_id is not None
    first = card.pending_change_id
    cursor = session.get(WalletFeedCursor, wallet_google.CONSUMER)
    assert cursor is not None and cursor.cursor_id > 0
    # Read again: the cursor moved, nothing is marked twice, the oldest change stays.
    assert wallet_google.mark_pending_from_feed(session) == 0
    assert card.pending_change_id == first
    assert session.scalars(select(GoogleWalletObject)).all() == [card]


def test_feed_consumer_rolled_back_reads_the_same_changes_again(session: Session,
                                                                key_file: Path):
    member = new_member(session)
    wallet_google.save_link(session, PROGRAM, member, settings(key_file))
    wallet_google.mark_pending_from_feed(session)
    card = wallet_google.card_for(session, member)
    assert card is not None
    card.pending_change_id = None
    session.flush()
    earn(session, member, 10)

    attempt = session.begin_nested()
    assert wallet_google.mark_pending_from_feed(session) == 1
    attempt.rollback()           # the process died before the commit
    session.expire_all()
    card = wallet_google.card_for(session, member)
    assert card is not None and card.pending_change_id is None
    assert wallet_google.mark_pending_from_feed(session) == 1
    assert card.pending_change_id is not None


def test_three_notifications_per_card_per_24_hours(session: Session, key_file: Path):
    member = new_member(session)
    wallet_google.save_link(session, PROGRAM, member, settings(key_file))
    card = wallet_google.card_for(session, member)
    assert card is not None
    now = utcnow()
    for hours in (23, 5, 1):
        session.add(GoogleNotification(object_row_id=card.id, kind="update",
                                       sent_at=now - timedelta(hours=hours)))
    session.flush()
    assert not wallet_google.may_notify(session, card, now)
    assert wallet_google.may_notify(session, card, now + timedelta(hours=1, minutes=1))


def test_backoff_doubles_and_honours_retry_after():
    backoff = wallet_google.Backoff(base_seconds=10, max_seconds=3600)
    assert timedelta(seconds=5) <= backoff.delay(1, None) <= timedelta(seconds=10)
    assert timedelta(seconds=40) <= backoff.delay(4, None) <= timedelta(seconds=80)
    assert backoff.delay(1, 600) >= timedelta(seconds=600)
    assert backoff.delay(30, None) <= timedelta(seconds=3600)


def test_wallet_channel_reaches_members_with_a_saved_card(session: Session, key_file: Path):
    wallet_messages.install()
    assert CONTACT_RESOLVERS["wallet"] is wallet_messages.wallet_contacts
    saved, unsaved = new_member(session), new_member(session)
    catalog = get_catalog(session)
    for member in (saved, unsaved):
        wallet_google.save_link(session, PROGRAM, member, settings(key_file))
        customer = member_customer(session, member)
        record_consent(session, customer, "loyalty", "wallet", "granted",
                       Proof("portal", "test"), catalog=catalog)
    card = wallet_google.card_for(session, saved)
    assert card is not None
    card.saved_at = utcnow()
    session.flush()

    answers = decide_many(session, catalog, [
        (member_customer(session, saved), "loyalty", "wallet"),
        (member_customer(session, unsaved), "loyalty", "wallet")], utcnow())
    assert answers[0].decision == "send"
    assert answers[0].contact == {"google_object_id": card.object_id}
    assert (answers[1].decision, answers[1].reason) == ("deny", "no_contact_point")


def member_customer(session: Session, member: Member) -> Customer:
    customer = session.get(Customer, member.customer_id)
    assert customer is not None
    return customer
