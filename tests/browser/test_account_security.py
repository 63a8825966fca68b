"""Account security as a person meets it, in a real browser: the sessions list and signing
out the others, "confirm it's you" by email, taking an address back from the old mailbox,
and what waits until the address is confirmed. axe checks every page on the way."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import LiveServer, assert_accessible
from tests.browser.test_portal import sign_up_and_verify

pytestmark = pytest.mark.browser

PASSWORD = "a long enough secret"
PHONE = ("Mozilla/5.0 (Android 14; Mobile; rv:128.0) Gecko/128.0 Firefox/128.0")


def sign_in(page: Page, email: str) -> None:
    page.goto("/login")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Sign in").click()


def test_two_devices_then_sign_out_everywhere_else(new_page: Callable[..., Page],
                                                   live: LiveServer):
    laptop = new_page(width=1280, height=900)
    sign_up_and_verify(laptop, live, "ada@example.com")
    phone = new_page(user_agent=PHONE)
    sign_in(phone, "ada@example.com")
    expect(phone.get_by_role("heading", name="Your preferences")).to_be_visible()

    phone.goto("/account")
    sessions = phone.locator("ul.sessions > li")
    expect(sessions).to_have_count(2)
    mine = sessions.filter(has_text="this browser")
    expect(mine.locator(".session-name")).to_contain_text("Firefox on Android")
    expect(mine).to_contain_text("Signed in with your password")

    laptop.goto("/account")
    # Each button says which session it ends, to a screen reader too.
    end_phone = laptop.get_by_role(
        "button", name=re.compile(r"^Sign out this session \(Firefox on Android, signed in .+\)$"))
    expect(end_phone).to_be_visible()
    expect(laptop.get_by_role(
        "button", name=re.compile(r"^Sign out \(Chrome on Linux, signed in .+\)$"))).to_be_visible()
    laptop.get_by_role("button", name="Sign out everywhere else").click()
    expect(laptop.get_by_text("Every other session is signed out.")).to_be_visible()
    expect(laptop.locator("ul.sessions > li")).to_have_count(1)
    expect(laptop.get_by_role("button", name="Sign out everywhere else")).to_have_count(0)

    phone.goto("/preferences")
    expect(phone).to_have_url(re.compile(r"/login"))
    expect(phone.get_by_role("heading", name="Sign in")).to_be_visible()


def test_confirm_it_is_you_by_email_then_delete_without_password(page: Page, live: LiveServer):
    sign_up_and_verify(page, live, "bea@example.com")  # an emailed link: not enough to delete
    page.goto("/account/delete")
    page.get_by_label("I understand that my account and data will be erased.").check()
    page.get_by_role("button", name="Delete my account for good").click()
    expect(page.get_by_text("Enter your current password, or ask below")).to_be_visible()

    page.get_by_role("button", name="Email me a confirmation link").click()
    expect(page.get_by_text("We sent a link to bea@example.com.")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/account/delete$"))

    page.goto(live.outbox.link("bea@example.com", contains="/account/confirm/"))
    expect(page.get_by_role("heading", name="Confirm it is you")).to_be_visible()
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(re.compile(r"/account/delete$"))
    expect(page.get_by_text("You confirmed it is you: until")).to_be_visible()
    page.get_by_label("I understand that my account and data will be erased.").check()
    page.get_by_role("button", name="Delete my account for good").click()
    expect(page.get_by_role("heading", name="Your account is deleted")).to_be_visible()


def test_download_asks_for_the_password_then_a_new_address_is_taken_back(
        page: Page, live: LiveServer, tmp_path: Path):
    sign_up_and_verify(page, live, "cleo@example.com")
    page.goto("/account")
    data = page.locator("section", has=page.get_by_role("heading", name="Your data"))
    data.get_by_role("button", name="Download my data").click()
    expect(data.get_by_text("Enter your current password, or ask below")).to_be_visible()
    expect(data.get_by_label("Current password")).to_have_attribute("aria-invalid", "true")
    data.get_by_label("Current password").fill(PASSWORD)
    with page.expect_download() as info:
        data.get_by_role("button", name="Download my data").click()
    exported = json.loads(Path(info.value.path()).read_text())
    assert "cleo@example.com" in json.dumps(exported)

    page.goto("/account")
    email = page.locator("section", has=page.get_by_role("heading", name="Email address"))
    email.get_by_label("New email address").fill("cleo@example.org")
    email.get_by_label("Current password").fill(PASSWORD)
    email.get_by_role("button", name="Change my email address").click()
    expect(page.get_by_text("We sent a confirmation link to cleo@example.org.")).to_be_visible()
    page.goto(live.outbox.link("cleo@example.org", contains="/account/email/"))
    expect(page.get_by_text("Your email address is now cleo@example.org.")).to_be_visible()

    # The old mailbox is told, and takes the account back.
    page.goto(live.outbox.link("cleo@example.com", contains="/account/email/undo/"))
    expect(page.get_by_role("heading", name="Restore your email address")).to_be_visible()
    expect(page.get_by_text("Make cleo@example.com the address of your account again.")) \
        .to_be_visible()
    page.get_by_role("button", name="Restore my address").click()
    expect(page.get_by_text("Your email address is cleo@example.com again")).to_be_visible()
    expect(page.locator("section", has=page.get_by_role("heading", name="Email address"))
           .locator("strong")).to_have_text("cleo@example.com")


def test_unconfirmed_address_holds_email_and_loyalty_until_the_resent_link(
        page: Page, live: LiveServer):
    page.goto("/signup")
    page.get_by_label("Email address").fill("dan@example.com")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create my account").click()
    expect(page.get_by_role("heading", name="Check your inbox")).to_be_visible()
    sign_in(page, "dan@example.com")

    notice = page.locator("#unconfirmed")
    expect(notice).to_contain_text("Your email address is not confirmed yet")
    page.locator("#topic-newsletter").get_by_label("Email").check()
    page.get_by_role("button", name="Save my preferences").click()
    expect(page.get_by_text("Email subscriptions start once your email address is confirmed")) \
        .to_be_visible()
    expect(page.locator("#topic-newsletter").get_by_label("Email")).not_to_be_checked()

    page.get_by_role("link", name="Loyalty").click()
    expect(notice).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("^Join"))).to_have_count(0)
    notice.get_by_role("button", name="Send the confirmation email again").click()
    expect(page.get_by_text("We sent a new confirmation link to dan@example.com.")) \
        .to_be_visible()
    expect(page).to_have_url(re.compile(r"/loyalty$"))
    assert_accessible(page)

    page.goto(live.outbox.link("dan@example.com", contains="/verify/"))
    expect(page.get_by_text("Your email address is confirmed")).to_be_visible()
    expect(page.locator("#unconfirmed")).to_have_count(0)
    page.goto("/loyalty")
    expect(page.get_by_role("button", name=re.compile("^Join"))).to_be_visible()
