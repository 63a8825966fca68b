"""Google Wallet cards kept up to date by the worker, against a local Google over real HTTP:
the token grant, class and object creation, PATCH bodies, the notification quota, retries and
a worker that dies between claiming a card and sending its update."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session

from passes.google import build_loyalty_class
from portal.core.db import new_session, utcnow
from portal.loyalty.ledger import leave
from portal.loyalty.models import Member
from portal.models.google_wallet import GoogleNotification, GoogleWalletObject
from portal.outbox import worker
from portal.services import wallet_google
from portal.wallet_sync import google_client
from tests.support.fake_google import FakeGoogle
from tests.support.wallet_google import PROGRAM, earn, google_app, google_fake, new_member  # noqa: F401  (fixtures)

CLASS_ID = "3388000000000000000.carnet-rewards"




class Cards:
    """A member with a card issued through the save link, and the worker around it."""

    def __init__(self, app: Flask, google: FakeGoogle) -> None:
        self.app, self.google = app, google
        self.settings = wallet_google.settings_from(app.config)

    def session(self) -> Session:
        return new_session(self.app)

    def member_with_card(self, points: int = 0) -> int:
        session = self.session()
        with session.begin():
            member = new_member(session)
            if points:
                earn(session, member, points)
            wallet_google.save_link(session, PROGRAM, member, self.settings)
            # The card starts in sync with what the link showed.
            wallet_google.mark_pending_from_feed(session)
            card = wallet_google.card_for(session, member)
            assert card is not None
            card.pending_change_id = None
            member_id = member.id
        session.close()
        return member_id

    def earn(self, member_id: int, points: int) -> None:
        session = self.session()
        with session.begin():
            member = session.get(Member, member_id)
            assert member is not None
            earn(session, member, points)
        session.close()

    def card(self, member_id: int) -> GoogleWalletObject:
        session = self.session()
        with session.begin():
            card = session.scalars(select(GoogleWalletObject).where(
                GoogleWalletObject.member_id == member_id)).one()
        session.close()
        return card

    def sync(self, **kw: Any) -> wallet_google.SyncReport:
        client = google_client(self.app)
        assert client is not None
        return wallet_google.sync_pending(self.session, client, PROGRAM, self.settings, **kw)

    def patches(self) -> list[Any]:
        return [r for r in self.google.wallet_requests if r.method == "PATCH"]


@pytest.fixture
def cards(app: Flask, google: FakeGoogle) -> Cards:
    return Cards(app, google)


def test_the_worker_job_creates_class_and_object_then_patches_with_a_notification(
        app: Flask, cards: Cards, google: FakeGoogle):
    member_id = cards.member_with_card(points=100)
    cards.earn(member_id, 50)
    first = worker.run_once(app, ["wallet.google.sync"])["wallet.google.sync"]
    assert isinstance(first, wallet_google.SyncReport) and first.created == 1

    # One JWT-bearer grant, accepted; then GET 404 / POST for the class and the object.
    assert len(google.token_requests) == 1 and google.token_rejections == []
    steps = [(r.method, r.path.rsplit("/v1/", 1)[1].split("/")[0]) for r in
             google.wallet_requests]
    assert steps == [("PATCH", "loyaltyObject"), ("GET", "loyaltyClass"),
                     ("POST", "loyaltyClass"), ("GET", "loyaltyObject"),
                     ("POST", "loyaltyObject")]
    card = cards.card(member_id)
    assert google.classes[CLASS_ID]["programName"] == "Carnet Rewards"
    created = google.objects[card.object_id]
    assert created["loyaltyPoints"]["balance"] == {"int": 150} and created["state"] == "ACTIVE"
    assert card.pending_change_id is None and card.inserted_at is not None
    assert (card.synced_points, card.attempts, card.last_error) == (150, 0, None)

    cards.earn(member_id, 900)          # 1,050 earned: Silver
    second = worker.run_once(app, ["wallet.google.sync"])["wallet.google.sync"]
    assert isinstance(second, wallet_google.SyncReport) and second.notified == 1
    patch = cards.patches()[-1]
    assert patch.path.endswith("/loyaltyObject/" + card.object_id)
    assert patch.body["loyaltyPoints"]["balance"] == {"int": 1050}
    assert patch.body["secondaryLoyaltyPoints"]["balance"] == {"string": "Silver"}
    assert patch.body["notifyPreference"] == "NOTIFY_ON_UPDATE"
    assert patch.body["textModulesData"][0]["body"] == "3,950 points to Gold"
    assert google.objects[card.object_id]["loyaltyPoints"]["balance"] == {"int": 1050}
    assert len(google.token_requests) == 1       # the token is reused across runs
    assert cards.card(member_id).pending_change_id is None


def test_the_fourth_notification_within_24_hours_is_sent_silently(cards: Cards,
                                                                  google: FakeGoogle):
    member_id = cards.member_with_card(points=10)
    cards.earn(member_id, 1)
    cards.sync()                                          # creates the object
    now = utcnow()
    for step in range(4):
        cards.earn(member_id, 10)
        cards.sync(now=now + timedelta(minutes=step))
    patches = cards.patches()[-4:]
    assert [p.body.get("notifyPreference") for p in patches] == \
        ["NOTIFY_ON_UPDATE"] * 3 + [None]
    assert patches[-1].body["loyaltyPoints"]["balance"] == {"int": 51}   # updated all the same
    session = cards.session()
    with session.begin():
        assert len(session.scalars(select(GoogleNotification)).all()) == 3
    session.close()

    cards.earn(member_id, 10)                             # a day after the first one
    cards.sync(now=now + timedelta(hours=24, seconds=1))
    assert cards.patches()[-1].body["notifyPreference"] == "NOTIFY_ON_UPDATE"


def test_503_and_429_are_retried_later_honouring_retry_after(cards: Cards,
                                                            google: FakeGoogle):
    member_id = cards.member_with_card(points=10)
    cards.earn(member_id, 1)
    cards.sync()
    now = utcnow()

    cards.earn(member_id, 5)
    google.fail_next(1, 503)
    report = cards.sync(now=now)
    assert report.retrying == 1
    card = cards.card(member_id)
    assert card.pending_change_id is not None and card.attempts == 1
    assert "503" in (card.last_error or "")
    assert card.next_attempt_at is not None and card.next_attempt_at > now
    sent = len(google.wallet_requests)
    cards.sync(now=now + timedelta(seconds=1))            # not due yet: nothing goes out
    assert len(google.wallet_requests) == sent

    google.fail_next(1, 429, retry_after="600")
    cards.sync(now=card.next_attempt_at)
    card = cards.card(member_id)
    assert card.attempts == 2 and "429" in (card.last_error or "")
    assert card.next_attempt_at is not None
    assert card.next_attempt_at >= now + timedelta(seconds=600)

    report = cards.sync(now=card.next_attempt_at)
    assert report.updated == 1
    assert cards.patches()[-1].body["loyaltyPoints"]["balance"] == {"int": 16}
    card = cards.card(member_id)
    assert (card.pending_change_id, card.attempts, card.last_error) == (None, 0, None)


def test_a_permanent_error_is_recorded_and_the_next_change_tries_again(cards: Cards,
                                                                      google: FakeGoogle):
    member_id = cards.member_with_card(points=10)
    cards.earn(member_id, 1)
    cards.sync()
    cards.earn(member_id, 2)
    google.fail_next(1, 400, message="Invalid loyaltyPoints")
    report = cards.sync()
    assert report.failed == 1
    card = cards.card(member_id)
    assert card.failed_at is not None and "Invalid loyaltyPoints" in (card.last_error or "")
    assert card.pending_change_id is None            # not retried in a loop

    cards.earn(member_id, 3)
    assert cards.sync().updated == 1
    card = cards.card(member_id)
    assert card.failed_at is None and card.synced_points == 16


def test_a_card_whose_sync_raises_is_retried_and_the_others_are_synced(
        app: Flask, cards: Cards, google: FakeGoogle):
    """An answer our code cannot read (not JSON) makes that card's sync raise: the card is
    retried with backoff, and the other cards of the run are synced."""
    first, second = cards.member_with_card(points=10), cards.member_with_card(points=20)
    cards.earn(first, 1)
    cards.earn(second, 2)
    google.garble_next(1)   # the first card's PATCH
    report = worker.run_once(app, ["wallet.google.sync"])["wallet.google.sync"]
    assert isinstance(report, wallet_google.SyncReport)
    assert report.claimed == 2 and report.retrying == 1
    poisoned, synced = cards.card(first), cards.card(second)
    assert synced.pending_change_id is None and synced.synced_points == 22
    assert poisoned.pending_change_id is not None and poisoned.attempts == 1
    assert poisoned.next_attempt_at is not None and poisoned.leased_until is None
    assert poisoned.last_error == "unexpected error (JSONDecodeError)"


def test_nothing_is_lost_when_the_worker_dies_between_claim_and_send(
        cards: Cards, google: FakeGoogle, monkeypatch: pytest.MonkeyPatch):
    member_id = cards.member_with_card(points=10)
    cards.earn(member_id, 1)
    cards.sync()
    cards.earn(member_id, 7)
    now = utcnow()

    client = google_client(cards.app)
    assert client is not None

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt("worker killed")

    monkeypatch.setattr(client, "patch_object", killed)
    with pytest.raises(KeyboardInterrupt):
        cards.sync(now=now)
    monkeypatch.undo()
    card = cards.card(member_id)
    assert card.pending_change_id is not None and card.leased_until is not None

    patches = len(cards.patches())
    cards.sync(now=now + timedelta(seconds=5))   # another worker: the lease still holds
    assert len(cards.patches()) == patches

    cards.earn(member_id, 2)                      # and the member kept shopping
    report = cards.sync(now=card.leased_until + timedelta(seconds=1))
    assert report.updated == 1
    assert cards.patches()[-1].body["loyaltyPoints"]["balance"] == {"int": 20}
    assert cards.card(member_id).pending_change_id is None


def test_a_card_saved_from_the_link_is_updated_and_counts_as_saved(cards: Cards,
                                                                  google: FakeGoogle):
    member_id = cards.member_with_card(points=10)
    card = cards.card(member_id)
    client = google_client(cards.app)
    assert client is not None
    # The member saved the link: Google created the class and the object from it.
    program = wallet_google.program_data(PROGRAM, cards.settings)
    client.ensure_class(build_loyalty_class(program))
    session = cards.session()
    with session.begin():
        member = session.get(Member, member_id)
        assert member is not None
        data = wallet_google.member_data(session, PROGRAM, member, cards.settings)
    session.close()
    client.ensure_object(wallet_google.object_body(PROGRAM, cards.settings, data))
    with google.state.lock:
        google.state.objects[card.object_id]["hasUsers"] = True

    cards.earn(member_id, 5)
    assert cards.sync().updated == 1
    card = cards.card(member_id)
    assert card.saved_at is not None and card.inserted_at is None
    assert google.objects[card.object_id]["loyaltyPoints"]["balance"] == {"int": 15}


def test_leaving_the_programme_deactivates_the_card(cards: Cards, google: FakeGoogle):
    member_id = cards.member_with_card(points=10)
    cards.earn(member_id, 1)
    cards.sync()
    session = cards.session()
    with session.begin():
        member = session.get(Member, member_id)
        assert member is not None
        leave(session, PROGRAM, member, actor="test")
    session.close()
    cards.sync()
    patch = cards.patches()[-1]
    assert patch.body["state"] == "INACTIVE" and "notifyPreference" not in patch.body
    assert patch.body["loyaltyPoints"]["balance"] == {"int": 0}


def test_cli_google_sync_resends_every_card(app: Flask, cards: Cards, google: FakeGoogle):
    first, second = cards.member_with_card(points=10), cards.member_with_card(points=20)
    result: Result = app.test_cli_runner().invoke(args=["wallet", "google-sync", "--all"])
    assert result.exit_code == 0, result.output
    assert "2 created" in result.output
    assert {cards.card(first).object_id, cards.card(second).object_id} <= set(google.objects)
