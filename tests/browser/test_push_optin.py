"""Browser notification opt-in in a real Chromium. Headless Chromium cannot create a push
subscription offline, so ``pushManager.subscribe`` and the permission prompt are stubbed in
the page; the service worker, the panel's script and the server run for real."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select
from sqlalchemy.orm import Session

from portal.core.db import get_engine
from portal.models.consent import ConsentState
from portal.push.models import PushSubscription
from portal.push.webpush import generate_vapid_keys
from portal.services import accounts
from tests.browser.conftest import LiveServer
from tests.support.fake_push_service import make_fake_subscription

pytestmark = pytest.mark.browser

PASSWORD = "a long enough secret"

# Records every call in window.__push; the permission and the subscription survive reloads
# through localStorage, as the browser's own would.
STUB = """
(() => {
  const SUB = %(subscription)s;
  const ANSWER = %(answer)s;
  const log = (window.__push = {calls: []});
  const store = window.localStorage;
  if (!window.Notification || !window.PushManager) return;
  Object.defineProperty(Notification, 'permission', {
    configurable: true, get: () => store.getItem('stub-permission') || 'default'});
  Notification.requestPermission = () => {
    log.calls.push('requestPermission');
    store.setItem('stub-permission', ANSWER);
    return Promise.resolve(ANSWER);
  };
  const fake = {
    endpoint: SUB.endpoint, expirationTime: null,
    toJSON: () => SUB,
    unsubscribe: () => { store.removeItem('stub-subscribed'); return Promise.resolve(true); },
  };
  PushManager.prototype.subscribe = function (options) {
    log.calls.push('subscribe');
    log.options = {userVisibleOnly: options.userVisibleOnly,
                   keyLength: new Uint8Array(options.applicationServerKey).length};
    store.setItem('stub-subscribed', '1');
    return Promise.resolve(fake);
  };
  PushManager.prototype.getSubscription = function () {
    return Promise.resolve(store.getItem('stub-subscribed') ? fake : null);
  };
})();
"""


@pytest.fixture
def keys(live: LiveServer):
    pair = generate_vapid_keys()
    live.app.config["VAPID_PRIVATE_KEY"] = pair.private_pem
    return pair


def stub(page: Page, answer: str = "granted") -> dict:
    subscription, _ = make_fake_subscription("https://push.example.net")
    page.add_init_script(STUB % {"subscription": json.dumps(subscription),
                                 "answer": json.dumps(answer)})
    return subscription


def sign_in(page: Page, live: LiveServer, email: str) -> int:
    with Session(get_engine(live.app)) as session, session.begin():
        customer = accounts.create_customer(session, email, password=PASSWORD, locale="en")
        accounts.mark_email_verified(session, customer, email)
        customer_id = customer.id
    page.goto("/login")
    page.get_by_label("Email address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").last.click()
    expect(page.get_by_role("heading", name="Your preferences")).to_be_visible()
    return customer_id


def calls(page: Page) -> list[str]:
    return page.evaluate("window.__push.calls")


def test_soft_prompt_then_permission_then_subscription_then_matrix(page: Page, live: LiveServer,
                                                                   keys):
    subscription = stub(page)
    customer_id = sign_in(page, live, "nina@example.com")
    panel = page.locator("#push")
    expect(panel.get_by_text("Get a short notification in this browser")).to_be_visible()
    choose = panel.get_by_role("button", name="Choose notifications")
    expect(choose).to_be_visible()
    expect(panel.get_by_label("Offers and promotions")).to_be_hidden()
    choose.click()

    # The soft prompt: topics and what happens next, before any browser prompt.
    expect(panel.get_by_text("Next, your browser asks whether")).to_be_visible()
    assert calls(page) == []
    allow = panel.get_by_role("button", name="Allow notifications")
    allow.click()
    expect(panel.get_by_text("Pick at least one topic first.")).to_be_visible()
    assert calls(page) == []
    panel.get_by_label("Offers and promotions").check()
    allow.click()
    expect(panel.get_by_text("Notifications are on in this browser.")).to_be_visible()
    assert calls(page) == ["requestPermission", "subscribe"]
    assert page.evaluate("window.__push.options") == {"userVisibleOnly": True, "keyLength": 65}
    # The matrix on the same page follows at once.
    expect(page.locator("#topic-offers").get_by_label("Browser notifications")).to_be_checked()

    with Session(get_engine(live.app)) as session:
        sub = session.scalars(select(PushSubscription)).one()
        assert (sub.endpoint, sub.customer_id) == (subscription["endpoint"], customer_id)
        state = session.get(ConsentState, (customer_id, "offers", "web_push"))
        assert state is not None and state.state == "granted"

    page.reload()
    expect(page.locator("#topic-offers").get_by_label("Browser notifications")).to_be_checked()
    expect(page.locator("#topic-newsletter").get_by_label("Browser notifications")) \
        .not_to_be_checked()
    expect(panel.get_by_role("button", name="Save my notification topics")).to_be_visible()
    page.get_by_role("link", name="History").click()
    expect(page.get_by_text("you agreed to Offers and promotions by Browser notifications "
                            "(in your browser)")).to_be_visible()


def test_a_visitor_opts_in_then_stops(page: Page, live: LiveServer, keys):
    stub(page)
    page.goto("/push")
    panel = page.locator("#push")
    panel.get_by_role("button", name="Choose notifications").click()
    panel.get_by_label("Events").check()
    panel.get_by_role("button", name="Allow notifications").click()
    expect(panel.get_by_text("Notifications are on in this browser.")).to_be_visible()
    page.reload()
    expect(panel.get_by_label("Events")).to_be_checked()
    panel.get_by_role("button", name="Stop notifications in this browser").click()
    expect(panel.get_by_text("Notifications are off in this browser.")).to_be_visible()
    with Session(get_engine(live.app)) as session:
        sub = session.scalars(select(PushSubscription)).one()
        assert sub.customer_id is None and sub.expired_reason == "left"


def test_refused_permission_sends_nothing(page: Page, live: LiveServer, keys):
    stub(page, answer="denied")
    page.goto("/push")
    panel = page.locator("#push")
    panel.get_by_role("button", name="Choose notifications").click()
    panel.get_by_label("Newsletter").check()
    panel.get_by_role("button", name="Allow notifications").click()
    expect(panel.get_by_text("Notifications are blocked for this site")).to_be_visible()
    assert calls(page) == ["requestPermission"]
    with Session(get_engine(live.app)) as session:
        assert session.scalars(select(PushSubscription)).all() == []


def test_the_page_offers_the_configured_public_key(live: LiveServer, keys):
    html = live.app.test_client().get("/push").get_data(as_text=True)
    assert f'data-vapid-key="{keys.public_key}"' in html
