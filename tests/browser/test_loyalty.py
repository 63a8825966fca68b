"""The loyalty page as a member sees it, in English and in French, in a real browser."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.core.db import get_engine
from portal.loyalty import ledger
from portal.models.customer import Customer
from tests.browser.conftest import LiveServer
from tests.browser.test_portal import sign_up_and_verify
from tests.support.wallet_google import PROGRAM

pytestmark = pytest.mark.browser


def join_and_earn(page: Page, live: LiveServer, email: str, points: int) -> str:
    sign_up_and_verify(page, live, email)
    page.get_by_role("link", name="Loyalty").click()
    page.get_by_role("button", name="Join Carnet Rewards").click()
    expect(page.get_by_text("This field is required.").or_(
        page.get_by_text("accept the terms", exact=False)).first).to_be_visible()
    page.get_by_label("I accept the programme terms above.").check()
    page.get_by_role("button", name="Join Carnet Rewards").click()
    expect(page.get_by_text("Welcome to Carnet Rewards!")).to_be_visible()
    with Session(get_engine(live.app)) as session, session.begin():
        customer = session.scalars(select(Customer).where(Customer.email == email)).one()
        member = ledger.member_for(session, customer)
        assert member is not None
        ledger.earn(session, PROGRAM, member, points, reason="Order 1042",
                    actor="store:paris-11", source_ref="1042")
        return member.member_number


def test_member_page_in_english_then_french(page: Page, live: LiveServer):
    number = join_and_earn(page, live, "noor@example.com", 1234)
    page.reload()

    card = page.locator(".loyalty-card")
    expect(card.locator(".loyalty-balance")).to_have_text("1,234 points")
    expect(card.locator(".loyalty-tier")).to_have_text("Silver")
    expect(card.locator(".loyalty-number")).to_have_text(number)
    expect(card.locator(".loyalty-qr svg")).to_be_visible()
    expect(page.locator(".loyalty-to-next")).to_have_text("3,766 points to Gold")
    expect(page.locator("progress.loyalty-progress")).to_have_attribute("value", re.compile(r"\d+"))
    expect(page.locator(".loyalty-history")).to_contain_text("Order 1042")

    page.get_by_role("button", name="Français").click()
    expect(page.get_by_role("heading", name="Carnet Fidélité", exact=True)).to_be_visible()
    # French groups thousands and ties numbers to units with (narrow) no-break spaces.
    expect(card.locator(".loyalty-balance")).to_have_text(
        re.compile(r"^1\s234\spoints$"))
    expect(card.locator(".loyalty-tier")).to_have_text("Argent")
    expect(page.locator(".loyalty-to-next")).to_have_text(
        re.compile(r"^Encore\s3\s766\spoints\spour\satteindre\sle\sstatut\sOr$"))


def test_leaving_asks_for_confirmation_and_forfeits_points(page: Page, live: LiveServer):
    join_and_earn(page, live, "omar@example.com", 300)
    page.goto("/loyalty/leave")
    expect(page.get_by_role("heading", name=re.compile("Leave"))).to_be_visible()
    page.get_by_role("button", name="Leave and lose my points").click()
    page.goto("/loyalty")
    expect(page.get_by_role("button", name="Join Carnet Rewards")).to_be_visible()
