"""One-click unsubscribe (RFC 8058): GET never unsubscribes, the mailbox provider's POST does
without cookies or CSRF token, and only a token made for unsubscribing works."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from portal.models.consent import ConsentEvent
from portal.services import accounts
from portal.services.consent import Proof, current_states, record_consent
from portal.web import links
from tests.conftest import path_of, submit


@pytest.fixture
def customer(session):
    c = accounts.create_customer(session, "ann@example.com", password="correct horse 1")
    record_consent(session, c, "offers", "email", "granted", Proof("portal", "test"))
    session.commit()
    return c


def unsubscribe_path(app, customer, topic="offers", channel="email"):
    with app.test_request_context():
        return path_of(links.unsubscribe_link(customer, topic, channel))


def events(session, customer):
    session.expire_all()
    return list(session.scalars(select(ConsentEvent).where(
        ConsentEvent.customer_id == customer.id).order_by(ConsentEvent.id)))


def test_get_shows_one_button_and_records_nothing(app, session, customer):
    path = unsubscribe_path(app, customer)
    before = len(events(session, customer))
    r = app.test_client().get(path)
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    content = html[html.index('<main'):html.index('</main>')]
    assert len(re.findall(r"<form\b", content)) == 1
    assert len(re.findall(r"<button\b", content)) == 1
    assert "Stop receiving Offers and promotions by Email?" in content
    assert len(events(session, customer)) == before
    assert current_states(session, customer)[("offers", "email")] == "granted"


def test_one_click_post_without_cookie_or_csrf_withdraws(app, session, customer):
    path = unsubscribe_path(app, customer)
    mailbox_provider = app.test_client(use_cookies=False)
    r = mailbox_provider.post(path, data={"List-Unsubscribe": "One-Click"},
                              headers={"User-Agent": "MailProvider/2.0"})
    assert r.status_code == 200
    last = events(session, customer)[-1]
    assert (last.topic_key, last.channel, last.state, last.source) == (
        "offers", "email", "withdrawn", "one_click")
    assert current_states(session, customer)[("offers", "email")] == "withdrawn"


def test_post_from_the_page_withdraws_and_shows_done(app, session, customer):
    path = unsubscribe_path(app, customer)
    client = app.test_client()
    r = submit(client, path, {})
    assert r.status_code == 200
    assert "You will no longer receive Offers and promotions by Email." in \
        r.get_data(as_text=True)
    last = events(session, customer)[-1]
    assert (last.topic_key, last.channel, last.state, last.source) == (
        "offers", "email", "withdrawn", "link")


def test_channel_wide_link_switches_the_whole_channel_off(app, session, customer):
    path = unsubscribe_path(app, customer, "*", "email")
    r = app.test_client(use_cookies=False).post(path, data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200
    last = events(session, customer)[-1]
    assert (last.topic_key, last.channel, last.state) == ("*", "email", "withdrawn")


def test_confirmation_email_header_unsubscribes_with_one_click(app, session, outbox):
    c = accounts.create_customer(session, "bob@example.com", password="correct horse 1")
    # Confirmed: an unconfirmed address gets no subscription, hence no confirmation email.
    accounts.mark_email_verified(session, c, "bob@example.com")
    session.commit()
    client = app.test_client()
    submit(client, "/login", {"email": "bob@example.com", "password": "correct horse 1"})
    html = client.get("/preferences").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    client.post("/preferences", data={"csrf_token": token, "c:newsletter:email": "on",
                                      "c:orders:email": "on", "c:orders:app_push": "on"})
    header = outbox.last("bob@example.com")["List-Unsubscribe"]
    url = re.fullmatch(r"<(.+)>", header).group(1)
    r = app.test_client(use_cookies=False).post(path_of(url),
                                                 data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 200
    assert current_states(session, c)[("*", "email")] == "withdrawn"


def test_tampered_token_is_refused(app, session, customer):
    path = unsubscribe_path(app, customer)
    tampered = path[:-4] + ("AAAA" if not path.endswith("AAAA") else "BBBB")
    before = len(events(session, customer))
    client = app.test_client(use_cookies=False)
    r = client.get(tampered)
    assert r.status_code == 400
    assert "This unsubscribe link is not valid" in r.get_data(as_text=True)
    r = client.post(tampered, data={"List-Unsubscribe": "One-Click"})
    assert r.status_code == 400
    assert len(events(session, customer)) == before


def test_a_manage_token_is_not_an_unsubscribe_token(app, session, customer):
    with app.test_request_context():
        manage = links.token("manage", {"c": customer.public_id, "t": "offers", "ch": "email"})
    before = len(events(session, customer))
    client = app.test_client(use_cookies=False)
    assert client.get(f"/u/{manage}").status_code == 400
    assert client.post(f"/u/{manage}", data={"List-Unsubscribe": "One-Click"}
                       ).status_code == 400
    assert len(events(session, customer)) == before


def test_unsubscribe_token_does_not_sign_in(app, customer):
    path = unsubscribe_path(app, customer)
    client = app.test_client()
    assert client.get(path).status_code == 200
    assert client.get("/preferences").status_code == 302
    assert client.get("/m/" + path.rsplit("/", 1)[1]).status_code == 400
