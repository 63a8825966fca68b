"""A person's path through the portal in a real browser, on a phone-sized screen."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.core.db import get_engine
from portal.models.consent import ConsentEvent, ConsentState
from portal.models.customer import Customer
from portal.services.accounts import create_customer
from portal.web.links import unsubscribe_link
from tests.browser.conftest import LiveServer

pytestmark = pytest.mark.browser


def sign_up_and_verify(page: Page, live: LiveServer, email: str) -> None:
    page.goto("/signup")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password", exact=True).fill("a long enough secret")
    page.get_by_label("Repeat the password").fill("a long enough secret")
    page.get_by_role("button", name="Create my account").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
    page.goto(live.outbox.link(email, contains="/verify/"))
    expect(page.get_by_text("Your email address is confirmed")).to_be_visible()


def test_sign_up_verify_change_matrix_and_see_history(page: Page, live: LiveServer):
    sign_up_and_verify(page, live, "zoe@example.com")
    expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()

    offers = page.locator("#topic-offers")
    offers.get_by_label("SMS").check()
    page.get_by_label("Nothing by Post").check()
    page.get_by_role("button", name="Save my preferences").click()
    expect(page.get_by_text("Your preferences are saved.")).to_be_visible()
    expect(page.locator("#topic-offers").get_by_label("SMS")).to_be_checked()

    page.get_by_role("link", name="History").click()
    expect(page.get_by_text(
        "you agreed to Offers and promotions by SMS (on your preferences page)")).to_be_visible()
    expect(page.get_by_text("you switched off everything by Post")).to_be_visible()


def test_double_opt_in_email_confirmation(page: Page, live: LiveServer):
    sign_up_and_verify(page, live, "yann@example.com")
    page.locator("#topic-newsletter").get_by_label("Email").check()
    page.get_by_role("button", name="Save my preferences").click()
    expect(page.get_by_text("Check your inbox")).to_be_visible()
    expect(page.locator("#topic-newsletter").get_by_text("awaiting your confirmation")) \
        .to_be_visible()
    page.goto(live.outbox.link("yann@example.com", contains="/confirm/"))
    page.get_by_role("button", name="Yes, subscribe me").click()
    expect(page.get_by_text("Your subscription is confirmed")).to_be_visible()
    page.goto("/preferences")
    expect(page.locator("#topic-newsletter").get_by_text("awaiting your confirmation")) \
        .to_have_count(0)


def test_switch_to_french_and_back(page: Page, live: LiveServer):
    sign_up_and_verify(page, live, "lea@example.com")
    page.get_by_role("button", name="Français").click()
    expect(page.get_by_role("heading", name="Vos préférences")).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    page.reload()
    expect(page.get_by_role("heading", name="Vos préférences")).to_be_visible()
    page.get_by_role("button", name="English").click()
    expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()


def test_one_click_unsubscribe_from_an_email_link(page: Page, live: LiveServer):
    engine = get_engine(live.app)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        customer = create_customer(session, "max@example.com")
        public_id = customer.public_id
    with live.app.test_request_context():
        link = unsubscribe_link(customer, "offers", "email")

    page.goto(link)
    expect(page.get_by_role("heading", name="Unsubscribe")).to_be_visible()
    with Session(engine) as session:
        assert session.scalars(select(ConsentEvent)).all() == []  # GET changed nothing
    page.get_by_role("button", name="Unsubscribe").click()
    expect(page.get_by_text("You will no longer receive Offers and promotions by Email")) \
        .to_be_visible()
    with Session(engine) as session:
        cid = session.scalars(select(Customer.id).where(Customer.public_id == public_id)).one()
        state = session.get(ConsentState, (cid, "offers", "email"))
        assert state is not None and state.state == "withdrawn"


def test_magic_link_opens_preferences_without_password(page: Page, live: LiveServer):
    engine = get_engine(live.app)
    with Session(engine) as session, session.begin():
        create_customer(session, "ines@example.com")
    page.goto("/link")
    page.get_by_label("Email address").fill("ines@example.com")
    page.get_by_role("button", name="Email me a link").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
    page.goto(live.outbox.link("ines@example.com", contains="/m/"))
    expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()
