"""The /loyalty page through the Flask test client: joining with the terms, the member view,
French, and leaving with a confirmation step."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from portal.core.db import utcnow
from portal.loyalty import ledger
from portal.loyalty.program import load_program
from portal.models.customer import Customer
from tests.conftest import CATALOG, path_of, submit

PROGRAM = load_program(CATALOG)
assert PROGRAM is not None


def sign_up(client, outbox, email="lea@example.com"):
    submit(client, "/signup", {"email": email, "password": "correct horse 1",
                               "confirm": "correct horse 1"})
    client.get(path_of(outbox.link(contains="/verify/")))


def customer_by_email(session, email):
    return session.scalars(select(Customer).where(Customer.email == email)).one()


def join(client):
    return submit(client, "/loyalty", {"accept": "y", "terms_version": str(
        PROGRAM.terms.version)}, action="/loyalty/join")


def test_the_page_explains_the_programme_and_joining_needs_the_terms_ticked(client, outbox,
                                                                           session):
    sign_up(client, outbox)
    page = client.get("/loyalty").get_data(as_text=True)
    assert 'href="/loyalty"' in page                      # the navigation link
    assert PROGRAM.terms.text("en") in page
    assert f"version {PROGRAM.terms.version}" in page
    assert '<label for="accept">' in page

    refused = submit(client, "/loyalty", {"terms_version": str(PROGRAM.terms.version)},
                     action="/loyalty/join")
    assert refused.status_code == 422
    assert "Tick the box to accept the terms." in refused.get_data(as_text=True)
    assert ledger.member_for(session, customer_by_email(session, "lea@example.com")) is None

    joined = join(client)
    assert joined.status_code == 302
    member = ledger.member_for(session, customer_by_email(session, "lea@example.com"))
    assert member is not None and member.terms_version == PROGRAM.terms.version
    page = client.get("/loyalty").get_data(as_text=True)
    assert "Welcome to Carnet Rewards!" in page and member.member_number in page


def test_member_page_shows_balance_tier_progress_expiring_history_and_qr(client, outbox,
                                                                         session):
    sign_up(client, outbox)
    join(client)
    member = ledger.member_for(session, customer_by_email(session, "lea@example.com"))
    now = utcnow()
    old = now - timedelta(days=715)
    session.flush()
    ledger.earn(session, PROGRAM, member, 1120, reason="Order 7", actor="t", source_ref="7",
                store="Paris 11", occurred_at=old, now=old)
    ledger.earn(session, PROGRAM, member, 4430, reason="Order 8", actor="t", source_ref="8")
    ledger.redeem(session, PROGRAM, member, 1000, reason="Reward: scarf", actor="t")
    session.flush()

    page = client.get("/loyalty").get_data(as_text=True)
    assert "4,550 points" in page                                    # balance
    assert "Silver" in page                                          # tier
    assert '<progress class="loyalty-progress" max="100" value="85"' in page
    assert "570 points to Gold" in page                              # 5,000 - 4,430
    assert "120 points on" in page                                   # expiring within 30 days
    assert "Reward: scarf" in page and "Order 8" in page and "Paris 11" in page
    assert "<svg" in page and f'aria-label="QR code of member number {member.member_number}"' \
        in page
    assert 'id="wallet-buttons"' in page
    assert "<script" not in page


def test_the_page_speaks_french(client, outbox, session):
    sign_up(client, outbox)
    join(client)
    member = ledger.member_for(session, customer_by_email(session, "lea@example.com"))
    ledger.earn(session, PROGRAM, member, 1234, reason="Commande 9", actor="t")
    session.flush()
    submit(client, "/loyalty", {"locale": "fr", "next": "/loyalty"}, action="/locale")
    page = client.get("/loyalty").get_data(as_text=True)
    assert '<html lang="fr">' in page
    assert "Carnet Fidélité" in page and "Argent" in page
    assert "1\u202f234" in page or "1\xa0234" in page                # French digit grouping


def test_leaving_asks_for_confirmation_then_forfeits_the_points(client, outbox, session):
    sign_up(client, outbox)
    join(client)
    member = ledger.member_for(session, customer_by_email(session, "lea@example.com"))
    ledger.earn(session, PROGRAM, member, 300, reason="Order 1", actor="t")
    session.flush()
    confirm = client.get("/loyalty/leave").get_data(as_text=True)
    assert "lose your 300 points" in confirm
    assert member.left_at is None
    left = submit(client, "/loyalty/leave", {})
    assert left.status_code == 302
    session.expire_all()
    assert member.left_at is not None and member.balance == 0
    page = client.get("/loyalty").get_data(as_text=True)
    assert "You have left Carnet Rewards." in page
    assert 'name="accept"' in page                                   # the join form again
