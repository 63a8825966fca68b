"""The preference page: the topic × channel matrix, double opt-in, global switches, contact
points, contact pressure, history and the language switcher."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from sqlalchemy import select

from portal import create_app
from portal.core.db import utcnow
from portal.models.consent import ConsentEvent, ConsentProof, ContactRule
from portal.models.customer import Customer
from portal.services import accounts
from portal.services.catalog import get_catalog
from portal.services.consent import current_states
from portal.services.decisions import consent_matrix
from tests.conftest import app_config, csrf_from, path_of, submit

PASSWORD = "correct horse 1"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) CarnetTest/1.0"


class Checkboxes(HTMLParser):
    """The checkboxes of the preference form, as a browser would send them."""

    def __init__(self) -> None:
        super().__init__()
        self.in_form = False
        self.names: list[str] = []
        self.checked: set[str] = set()
        self.disabled: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.in_form = a.get("action") == "/preferences"
        elif tag == "input" and self.in_form and a.get("type") == "checkbox":
            self.names.append(a["name"])
            if "checked" in a:
                self.checked.add(a["name"])
            if "disabled" in a:
                self.disabled.add(a["name"])

    def handle_endtag(self, tag):
        if tag == "form":
            self.in_form = False


def checkboxes(html: str) -> Checkboxes:
    parser = Checkboxes()
    parser.feed(html)
    return parser


def save(client, on=(), off=(), **kwargs):
    """Tick ``on`` and untick ``off`` on the page as shown, then save like a browser."""
    html = client.get("/preferences").get_data(as_text=True)
    boxes = checkboxes(html)
    sent = (boxes.checked - boxes.disabled - set(off)) | set(on)
    data = {"csrf_token": csrf_from(html), **{name: "on" for name in sent}}
    return client.post("/preferences", data=data, **kwargs)


@pytest.fixture
def customer(session):
    c = accounts.create_customer(session, "ann@example.com", password=PASSWORD, locale="en")
    accounts.mark_email_verified(session, c, "ann@example.com")
    session.commit()
    return c


@pytest.fixture
def signed_in(client, customer):
    r = submit(client, "/login", {"email": "ann@example.com", "password": PASSWORD})
    assert r.status_code == 302
    return client


def events(session, customer):
    return list(session.scalars(select(ConsentEvent).where(
        ConsentEvent.customer_id == customer.id).order_by(ConsentEvent.id)))


def states(session, customer):
    session.expire_all()
    return current_states(session, customer)


# --- the matrix ------------------------------------------------------------------------------


def test_matrix_shows_only_offered_cells(signed_in, session):
    html = signed_in.get("/preferences").get_data(as_text=True)
    names = set(checkboxes(html).names)
    catalog = get_catalog(session)
    offered = {f"c:{t.key}:{ch}" for t in catalog.ordered() for ch in t.channels}
    assert {n for n in names if n.startswith("c:")} == offered
    assert "c:offers:wallet" in names
    assert "c:newsletter:sms" not in names
    assert "c:account:voice" not in names
    # service defaults show as on, marketing as off, the required topic on and locked
    boxes = checkboxes(html)
    assert "c:orders:email" in boxes.checked
    assert "c:newsletter:web_push" not in boxes.checked
    assert {"c:account:email", "c:account:sms"} <= boxes.checked & boxes.disabled


def test_saving_records_one_event_per_changed_cell_with_proof(signed_in, session, customer):
    r = save(signed_in, on={"c:offers:sms", "c:newsletter:web_push"}, off={"c:orders:app_push"},
             headers={"User-Agent": BROWSER})
    assert r.status_code == 302
    assert "Your preferences are saved." in signed_in.get("/preferences").get_data(as_text=True)
    recorded = events(session, customer)
    assert {(e.topic_key, e.channel, e.state) for e in recorded} == {
        ("offers", "sms", "granted"), ("newsletter", "web_push", "granted"),
        ("orders", "app_push", "withdrawn")}
    catalog = get_catalog(session)
    for event in recorded:
        assert event.source == "portal"
        assert event.actor == f"customer:{customer.public_id}"
        topic = catalog.get(event.topic_key)
        assert (event.wording_version, event.wording_hash) == (topic.wording_version,
                                                               topic.wording_hash)
        proof = session.get(ConsentProof, event.id)
        assert proof.ip == "127.0.0.1"
        assert proof.user_agent == BROWSER
    assert states(session, customer)[("offers", "sms")] == "granted"

    # Saving the page unchanged records nothing.
    r = save(signed_in)
    assert len(events(session, customer)) == 3
    assert "Nothing changed." in signed_in.get("/preferences").get_data(as_text=True)


def test_marketing_email_waits_for_confirmation(app, signed_in, session, customer, outbox):
    save(signed_in, on={"c:newsletter:email"})
    assert states(session, customer)[("newsletter", "email")] == "pending"
    page = signed_in.get("/preferences").get_data(as_text=True)
    assert "awaiting your confirmation" in page

    mail = outbox.last("ann@example.com")
    assert mail["List-Unsubscribe"].startswith("<http://localhost/u/")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = path_of(outbox.link("ann@example.com", "/confirm/"))

    elsewhere = app.test_client()  # the email may be opened on another device
    r = elsewhere.get(link)
    assert r.status_code == 200
    assert "Newsletter" in r.get_data(as_text=True)
    assert states(session, customer)[("newsletter", "email")] == "pending"

    r = submit(elsewhere, link, {})
    assert r.status_code == 200
    assert "Your subscription is confirmed" in r.get_data(as_text=True)
    assert states(session, customer)[("newsletter", "email")] == "granted"
    last = events(session, customer)[-1]
    assert (last.topic_key, last.channel, last.state, last.source) == (
        "newsletter", "email", "granted", "double_opt_in")
    matrix = consent_matrix(session, get_catalog(session), customer, utcnow())
    assert matrix[("newsletter", "email")].allowed

    # A second confirmation changes nothing.
    r = submit(elsewhere, link, {})
    assert "nothing left to confirm" in r.get_data(as_text=True)
    assert len(events(session, customer)) == 2


def test_confirmation_link_with_a_bad_token_is_refused(client):
    r = client.get("/confirm/not-a-token")
    assert r.status_code == 400
    assert "This link does not work" in r.get_data(as_text=True)


def test_without_double_opt_in_email_is_granted_at_once(connection, tmp_path, customer,
                                                        session):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, EMAIL_DOUBLE_OPT_IN=False))
    client = app.test_client()
    submit(client, "/login", {"email": "ann@example.com", "password": PASSWORD})
    save(client, on={"c:newsletter:email"})
    assert states(session, customer)[("newsletter", "email")] == "granted"
    assert not (tmp_path / "instance" / "outbox").exists() or \
        not list((tmp_path / "instance" / "outbox").glob("*.eml"))


def test_required_topic_cannot_be_switched_off_even_by_a_forged_post(signed_in, session,
                                                                     customer):
    html = signed_in.get("/preferences").get_data(as_text=True)
    # A forged post that leaves out the locked boxes and even names them "off".
    r = signed_in.post("/preferences", data={"csrf_token": csrf_from(html),
                                             "c:orders:email": "on", "c:orders:app_push": "on",
                                             "c:account:email": "off", "c:account:sms": "off"})
    assert r.status_code == 302
    assert not [e for e in events(session, customer) if e.topic_key == "account"]
    matrix = consent_matrix(session, get_catalog(session), customer, utcnow())
    assert matrix[("account", "email")].allowed
    assert matrix[("account", "sms")].reason == "required_service"


def test_pause_all_and_nothing_on_a_channel(signed_in, session, customer):
    save(signed_in, on={"c:offers:sms", "c:offers:postal"})
    save(signed_in, on={"paused"})
    recorded = events(session, customer)
    assert (recorded[-1].topic_key, recorded[-1].channel, recorded[-1].state) == \
        ("*", "*", "withdrawn")
    catalog = get_catalog(session)
    matrix = consent_matrix(session, catalog, customer, utcnow())
    assert matrix[("offers", "sms")].reason == "marketing_paused"
    assert not matrix[("offers", "sms")].allowed
    assert matrix[("orders", "email")].allowed  # service messages still reach them
    page = signed_in.get("/preferences").get_data(as_text=True)
    assert "paused" in checkboxes(page).checked
    assert "c:offers:sms" in checkboxes(page).checked  # the choice itself is kept

    save(signed_in, on={"off:sms"}, off={"paused"})
    recorded = events(session, customer)
    assert {(e.topic_key, e.channel, e.state) for e in recorded[-2:]} == {
        ("*", "*", "granted"), ("*", "sms", "withdrawn")}
    matrix = consent_matrix(session, catalog, customer, utcnow())
    assert matrix[("offers", "sms")].reason == "channel_off"
    assert matrix[("orders", "sms")].reason == "channel_off"
    assert matrix[("offers", "postal")].allowed
    assert matrix[("account", "sms")].allowed  # required messages ignore the switch
    assert "off:sms" in checkboxes(signed_in.get("/preferences").get_data(as_text=True)).checked


# --- contact points ----------------------------------------------------------------------------


def test_phone_is_stored_in_e164_with_postal_address(signed_in, session, customer):
    r = submit(signed_in, "/preferences", {"phone": "+33 6 12 34 56 78",
                                           "postal_address": "1 rue de la Paix\n75002 Paris"},
               action="/preferences/contact")
    assert r.status_code == 302
    session.expire_all()
    row = session.get(Customer, customer.id)
    assert row.phone == "+33612345678"
    assert row.postal_address == "1 rue de la Paix\n75002 Paris"


def test_bad_phone_is_refused(signed_in, session, customer):
    r = submit(signed_in, "/preferences", {"phone": "12345", "postal_address": ""},
               action="/preferences/contact")
    assert r.status_code == 422
    assert "Enter a valid mobile number" in r.get_data(as_text=True)
    session.expire_all()
    assert session.get(Customer, customer.id).phone is None


def test_bad_phone_error_is_in_french(signed_in):
    submit(signed_in, "/preferences", {"locale": "fr", "next": "/preferences"},
           action="/locale")
    r = submit(signed_in, "/preferences", {"phone": "12345", "postal_address": ""},
               action="/preferences/contact")
    assert r.status_code == 422
    assert "Saisissez un numéro de mobile valide" in r.get_data(as_text=True)


def test_phone_of_another_customer_is_refused(signed_in, session, customer):
    accounts.create_customer(session, "bob@example.com", phone="+33612345678")
    session.commit()
    r = submit(signed_in, "/preferences", {"phone": "+33 6 12 34 56 78", "postal_address": ""},
               action="/preferences/contact")
    assert r.status_code == 422
    assert "This phone number cannot be used." in r.get_data(as_text=True)
    session.expire_all()
    assert session.get(Customer, customer.id).phone is None


# --- contact pressure -------------------------------------------------------------------------


def test_contact_pressure_is_saved(signed_in, session, customer):
    r = submit(signed_in, "/preferences", {
        "timezone": "America/Montreal", "cap_email": "3", "quiet_start_sms": "21:30",
        "quiet_end_sms": "08:00"}, action="/preferences/pressure")
    assert r.status_code == 302
    session.expire_all()
    assert session.get(Customer, customer.id).timezone == "America/Montreal"
    rules = {r.channel: r for r in session.scalars(
        select(ContactRule).where(ContactRule.customer_id == customer.id))}
    assert rules["email"].max_per_week == 3
    assert rules["sms"].quiet_start.strftime("%H:%M") == "21:30"
    assert rules["sms"].quiet_end.strftime("%H:%M") == "08:00"
    assert rules["sms"].max_per_week is None
    page = signed_in.get("/preferences").get_data(as_text=True)
    assert 'value="21:30"' in page
    assert '<option value="America/Montreal" selected>' in page


@pytest.mark.parametrize(("data", "message"), [
    ({"timezone": "Mars/Olympus_Mons"}, "Choose a time zone from the list."),
    ({"timezone": "Europe/Paris", "cap_email": "many"}, "Choose a number between 1 and 100"),
    ({"timezone": "Europe/Paris", "cap_sms": "101"}, "Choose a number between 1 and 100"),
    ({"timezone": "Europe/Paris", "cap_sms": "-1"}, "Choose a number between 1 and 100"),
    ({"timezone": "Europe/Paris", "quiet_start_email": "22:00"},
     "Give both the start and the end of quiet hours."),
    ({"timezone": "Europe/Paris", "quiet_start_email": "25:99", "quiet_end_email": "07:00"},
     "Enter a time as HH:MM."),
])
def test_bad_contact_pressure_is_refused(signed_in, session, customer, data, message):
    r = submit(signed_in, "/preferences", data, action="/preferences/pressure")
    assert r.status_code == 422
    assert message in r.get_data(as_text=True)
    session.expire_all()
    assert session.get(Customer, customer.id).timezone is None
    assert not session.scalars(select(ContactRule).where(
        ContactRule.customer_id == customer.id)).all()


# --- history and language --------------------------------------------------------------------


def test_history_lists_sentences_newest_first(signed_in):
    save(signed_in, on={"c:offers:sms"})
    save(signed_in, off={"c:offers:sms"})
    html = signed_in.get("/preferences/history").get_data(as_text=True)
    withdrew = html.index("you withdrew Offers and promotions by SMS")
    agreed = html.index("you agreed to Offers and promotions by SMS")
    assert withdrew < agreed


def test_history_is_empty_at_first(signed_in):
    assert "No choices recorded yet." in signed_in.get("/preferences/history").get_data(
        as_text=True)


def test_locale_switcher_sticks_for_a_signed_in_customer(app, signed_in, session, customer):
    r = submit(signed_in, "/preferences", {"locale": "fr", "next": "/preferences"},
               action="/locale")
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/preferences"
    page = signed_in.get("/preferences").get_data(as_text=True)
    assert '<html lang="fr">' in page
    assert "Vos préférences" in page
    session.expire_all()
    assert session.get(Customer, customer.id).locale == "fr"

    # A new browser with English Accept-Language still gets French once signed in.
    other = app.test_client()
    submit(other, "/login", {"email": "ann@example.com", "password": PASSWORD})
    page = other.get("/preferences", headers={"Accept-Language": "en"}).get_data(as_text=True)
    assert '<html lang="fr">' in page


def test_locale_switcher_for_a_visitor_lasts_the_session(client):
    r = submit(client, "/", {"locale": "fr", "next": "/signup"}, action="/locale")
    assert path_of(r.headers["Location"]) == "/signup"
    assert '<html lang="fr">' in client.get("/signup").get_data(as_text=True)
    r = submit(client, "/", {"locale": "de", "next": "//evil.example"}, action="/locale")
    assert path_of(r.headers["Location"]) == "/"
    assert '<html lang="fr">' in client.get("/").get_data(as_text=True)  # "de" is ignored
    for target in ("/\t/evil.example", "/\n/evil.example", "/\\evil.example"):
        r = submit(client, "/", {"locale": "en", "next": target}, action="/locale")
        assert r.status_code == 302, target
        assert r.headers["Location"] == "/", target
