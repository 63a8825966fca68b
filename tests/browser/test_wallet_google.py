"""The "Add to Google Wallet" button on the loyalty page, in a real browser."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from passes.google import object_id_for
from passes.google_dev import create_dev_service_account
from portal.core.db import get_engine
from portal.loyalty import ledger
from portal.models.customer import Customer
from portal.models.google_wallet import GoogleWalletObject
from tests.browser.conftest import LiveServer
from tests.browser.test_portal import sign_up_and_verify
from tests.support.wallet_google import PROGRAM, decode_save_link

pytestmark = pytest.mark.browser


def test_member_page_offers_a_save_link_for_the_members_card(page: Page, live: LiveServer):
    key_file = Path(live.app.config["GOOGLE_SERVICE_ACCOUNT_FILE"])
    create_dev_service_account(key_file, token_uri="https://oauth2.googleapis.com/token")
    sign_up_and_verify(page, live, "ines@example.com")
    page.goto("/loyalty")
    page.get_by_label("I accept the programme terms above.").check()
    page.get_by_role("button", name="Join Carnet Rewards").click()
    expect(page.get_by_text("Welcome to Carnet Rewards!")).to_be_visible()

    with Session(get_engine(live.app)) as session, session.begin():
        customer = session.scalars(select(Customer).where(
            Customer.email == "ines@example.com")).one()
        member = ledger.member_for(session, customer)
        assert member is not None
        ledger.earn(session, PROGRAM, member, 1234, reason="Order 1", actor="store:test")
        number = member.member_number

    page.reload()
    button = page.locator("#wallet-buttons").get_by_role("link", name="Add to Google Wallet")
    expect(button).to_be_visible()
    assert button.evaluate("el => getComputedStyle(el).backgroundColor") == "rgb(0, 0, 0)"
    href = button.get_attribute("href")
    assert href is not None
    _, claims = decode_save_link(href, key_file)
    [obj] = claims["payload"]["loyaltyObjects"]
    assert obj["id"] == object_id_for(live.app.config["GOOGLE_ISSUER_ID"], number)
    assert obj["loyaltyPoints"]["balance"] == {"int": 1234}
    assert obj["secondaryLoyaltyPoints"]["balance"] == {"string": "Silver"}
    assert claims["origins"] == [live.url]

    # The card is now kept up to date by the worker.
    with Session(get_engine(live.app)) as session:
        assert session.scalars(select(GoogleWalletObject.object_id)).all() == [obj["id"]]

