"""Accounts through the portal: sign up, verification, log in/out, throttling, forgotten
password, emailed sign-in links, email and password changes, password hashing."""

from __future__ import annotations

import re

import argon2
from argon2.profiles import RFC_9106_LOW_MEMORY
from passlib.hash import bcrypt
from sqlalchemy import func, select

from portal import create_app
from portal.models.customer import Customer
from portal.services import accounts
from portal.web import links
from tests.conftest import app_config, csrf_from, path_of, submit

PASSWORD = "correct horse 1"


def make_customer(session, email="ann@example.com", password=PASSWORD, **fields):
    customer = accounts.create_customer(session, email, password=password, **fields)
    accounts.mark_email_verified(session, customer, email)
    session.commit()
    return customer


def log_in(client, email="ann@example.com", password=PASSWORD):
    return submit(client, "/login", {"email": email, "password": password})


def stored(session, customer):
    session.expire_all()
    return session.get(Customer, customer.id)


def without_tokens(html):
    return re.sub(r'value="[^"]*\.[^"]*"', 'value=""', html)


# --- sign up ----------------------------------------------------------------------------------


def test_signup_sends_verification_and_the_link_signs_in(client, outbox, session):
    r = submit(client, "/signup", {"email": "Ann@Example.com", "password": PASSWORD,
                                   "confirm": PASSWORD})
    assert r.status_code == 200
    assert "Check your inbox" in r.get_data(as_text=True)
    mail = outbox.last()
    assert mail["To"] == "ann@example.com"
    assert mail["Subject"] == "Confirm your email address"
    customer = session.scalars(select(Customer).where(Customer.email == "ann@example.com")).one()
    assert customer.email_verified_at is None

    r = client.get(path_of(outbox.link("ann@example.com", "/verify/")))
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/preferences"
    page = client.get("/preferences")
    assert page.status_code == 200
    assert "Newsletter" in page.get_data(as_text=True)
    assert stored(session, customer).email_verified_at is not None


def test_signup_in_french_sends_french_email(client, outbox, session):
    headers = {"Accept-Language": "fr-CA,en;q=0.5"}
    html = client.get("/signup", headers=headers).get_data(as_text=True)
    r = client.post("/signup", headers=headers, data={
        "csrf_token": csrf_from(html), "email": "claire@example.com", "password": PASSWORD,
        "confirm": PASSWORD})
    assert r.status_code == 200
    mail = outbox.last("claire@example.com")
    assert mail["Subject"] == "Confirmez votre adresse e-mail"
    assert mail["Content-Language"] == "fr"
    body = mail.get_body(preferencelist=("plain",)).get_content()
    assert "Bonjour" in body
    customer = session.scalars(select(Customer).where(Customer.email == "claire@example.com")
                               ).one()
    assert customer.locale == "fr"


def test_signup_with_a_taken_address_looks_the_same_and_tells_the_owner(app, outbox, session):
    make_customer(session, "owner@example.com")
    first, second = app.test_client(), app.test_client()
    new = submit(first, "/signup", {"email": "newcomer@example.com", "password": PASSWORD,
                                    "confirm": PASSWORD})
    taken = submit(second, "/signup", {"email": "owner@example.com", "password": PASSWORD,
                                       "confirm": PASSWORD})
    assert taken.status_code == new.status_code == 200
    assert without_tokens(taken.get_data(as_text=True)).replace("owner@", "X@") == \
        without_tokens(new.get_data(as_text=True)).replace("newcomer@", "X@")

    owner_mail = outbox.last("owner@example.com")
    assert "already have" in owner_mail.get_body(preferencelist=("plain",)).get_content()
    assert "/verify/" not in owner_mail.get_body(preferencelist=("plain",)).get_content()
    assert session.scalar(select(func.count()).select_from(Customer).where(
        Customer.email == "owner@example.com")) == 1
    # The requester is not signed in to the owner's account.
    assert second.get("/preferences").status_code == 302


def test_signup_with_a_taken_address_costs_a_password_hash_too(client, session, monkeypatch):
    """The answer must not come back faster for a known address."""
    make_customer(session, "owner@example.com")
    hashed = []
    real_hash = accounts.passwords.hash
    monkeypatch.setattr(accounts.passwords, "hash",
                        lambda secret, **kw: hashed.append(secret) or real_hash(secret, **kw))
    submit(client, "/signup", {"email": "owner@example.com", "password": PASSWORD + "x",
                               "confirm": PASSWORD + "x"})
    submit(client, "/signup", {"email": "fresh@example.com", "password": PASSWORD + "y",
                               "confirm": PASSWORD + "y"})
    assert hashed == [PASSWORD + "x", PASSWORD + "y"]


def test_verification_link_stops_signing_in_after_a_password_reset(app, outbox, session):
    client = app.test_client()
    submit(client, "/signup", {"email": "ann@example.com", "password": PASSWORD,
                               "confirm": PASSWORD})
    verify = path_of(outbox.link("ann@example.com", "/verify/"))
    submit(client, "/forgot", {"email": "ann@example.com"})
    reset = path_of(outbox.link("ann@example.com", "/reset/"))
    assert submit(client, reset, {"password": "a brand new secret",
                                  "confirm": "a brand new secret"}).status_code == 302

    stranger = app.test_client()
    r = stranger.get(verify)
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/login"
    assert stranger.get("/preferences").status_code == 302
    customer = session.scalars(select(Customer).where(Customer.email == "ann@example.com")).one()
    assert customer.email_verified_at is not None


def test_signup_field_errors(client, session):
    cases = [
        ({"email": "not-an-address", "password": PASSWORD, "confirm": PASSWORD},
         "Enter a valid email address."),
        ({"email": "bob@example.com", "password": "short", "confirm": "short"},
         "Use between 10 and 256 characters."),
        ({"email": "bob@example.com", "password": PASSWORD, "confirm": PASSWORD + "x"},
         "Passwords differ."),
    ]
    for data, message in cases:
        r = submit(client, "/signup", data)
        assert r.status_code == 422, data
        assert message in r.get_data(as_text=True)
    assert session.scalar(select(func.count()).select_from(Customer).where(
        Customer.email == "bob@example.com")) == 0


def test_signup_rejects_the_address_as_password(client):
    r = submit(client, "/signup", {"email": "longaddress@example.com",
                                   "password": "longaddress@example.com",
                                   "confirm": "longaddress@example.com"})
    assert r.status_code == 422
    assert "cannot be your email address" in r.get_data(as_text=True)


# --- log in / log out / throttling --------------------------------------------------------


def test_wrong_password_and_unknown_address_answer_alike(client, session):
    make_customer(session)
    wrong = log_in(client, "ann@example.com", "not the password")
    unknown = log_in(client, "nobody@example.com", "not the password")
    assert wrong.status_code == unknown.status_code == 401
    message = "That email and password do not match."
    assert message in wrong.get_data(as_text=True)
    assert message in unknown.get_data(as_text=True)
    assert client.get("/preferences").status_code == 302


def test_login_and_logout(client, session):
    make_customer(session)
    r = log_in(client)
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/preferences"
    assert client.get("/preferences").status_code == 200

    r = submit(client, "/preferences", {}, action="/logout")
    assert r.status_code == 302
    r = client.get("/preferences")
    assert r.status_code == 302
    assert path_of(r.headers["Location"]).startswith("/login")


def test_login_follows_a_local_next_only(client, session):
    make_customer(session)
    r = client.get("/account")
    assert path_of(r.headers["Location"]) == "/login?next=/account"
    html = client.get("/login?next=/account").get_data(as_text=True)
    r = client.post("/login?next=/account", data={"csrf_token": csrf_from(html),
                                                  "email": "ann@example.com",
                                                  "password": PASSWORD})
    assert path_of(r.headers["Location"]) == "/account"
    for target in ("//evil.example/", "https://evil.example/", "/\t/evil.example",
                   "/\\evil.example", "/\n/evil.example"):
        submit(client, "/account", {}, action="/logout")
        html = client.get("/login").get_data(as_text=True)
        r = client.post("/login", query_string={"next": target}, data={
            "csrf_token": csrf_from(html), "email": "ann@example.com", "password": PASSWORD})
        assert r.status_code == 302, target
        assert r.headers["Location"] == "/preferences", target


def test_login_is_throttled_after_the_configured_count(connection, tmp_path, session):
    make_customer(session)
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, LOGIN_RATE_LIMIT="3/300"))
    client = app.test_client()
    for _ in range(3):
        assert log_in(client, password="wrong password").status_code == 401
    r = log_in(client)  # even the right password waits
    assert r.status_code == 429
    assert "Too many attempts" in r.get_data(as_text=True)
    assert client.get("/preferences").status_code == 302


def test_logging_in_again_while_signed_in_works(client, session):
    make_customer(session)
    assert log_in(client).status_code == 302
    assert log_in(client).status_code == 302
    assert client.get("/preferences").status_code == 200


# --- forgotten password -------------------------------------------------------------------


def test_reset_link_works_once_and_ends_other_sessions(app, outbox, session):
    customer = make_customer(session)
    elsewhere = app.test_client()
    assert log_in(elsewhere).status_code == 302
    epoch = customer.auth_epoch

    client = app.test_client()
    r = submit(client, "/forgot", {"email": "ann@example.com"})
    assert r.status_code == 200
    link = path_of(outbox.link("ann@example.com", "/reset/"))
    r = submit(client, link, {"password": "a brand new secret", "confirm": "a brand new secret"})
    assert r.status_code == 302
    assert client.get("/preferences").status_code == 200
    assert stored(session, customer).auth_epoch == epoch + 1

    again = client.get(link)
    assert again.status_code == 400
    assert "already used" in again.get_data(as_text=True)

    assert elsewhere.get("/preferences").status_code == 302
    assert log_in(app.test_client()).status_code == 401
    assert log_in(app.test_client(), password="a brand new secret").status_code == 302


def test_forgot_answers_alike_for_unknown_addresses(client, outbox, session):
    make_customer(session)
    known = submit(client, "/forgot", {"email": "ann@example.com"})
    unknown = submit(client, "/forgot", {"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 200
    assert without_tokens(known.get_data(as_text=True)).replace("ann@", "X@") == \
        without_tokens(unknown.get_data(as_text=True)).replace("nobody@", "X@")
    assert [m["To"] for m in outbox.messages()] == ["ann@example.com"]


def test_reset_link_with_a_short_password_is_refused(client, outbox, session):
    make_customer(session)
    submit(client, "/forgot", {"email": "ann@example.com"})
    link = path_of(outbox.link("ann@example.com", "/reset/"))
    r = submit(client, link, {"password": "short", "confirm": "short"})
    assert r.status_code == 422
    assert "Use between 10 and 256 characters." in r.get_data(as_text=True)
    assert client.get(link).status_code == 200  # still unused


# --- emailed sign-in links ------------------------------------------------------------------


def test_manage_link_signs_in_and_opens_preferences(app, client, outbox, session):
    make_customer(session)
    r = submit(client, "/link", {"email": "ann@example.com"})
    assert r.status_code == 200
    link = path_of(outbox.link("ann@example.com", "/m/"))
    r = client.get(link)
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/preferences"
    assert client.get("/preferences").status_code == 200


def test_tampered_manage_link_is_refused(app, session):
    customer = make_customer(session)
    with app.test_request_context():
        link = path_of(links.manage_link(customer))
    client = app.test_client()
    tampered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    r = client.get(tampered)
    assert r.status_code == 400
    assert "This link does not work" in r.get_data(as_text=True)
    assert client.get("/preferences").status_code == 302


def test_manage_link_dies_when_the_password_changes(app, session):
    customer = make_customer(session)
    with app.test_request_context():
        link = path_of(links.manage_link(customer))
    accounts.set_password(session, customer, "another good secret")
    session.commit()
    assert app.test_client().get(link).status_code == 400


# --- account settings -----------------------------------------------------------------------


def test_change_email_needs_the_password_and_the_new_address_confirms(client, outbox, session):
    customer = make_customer(session)
    log_in(client)
    r = submit(client, "/account", {"email": "ann.new@example.com"}, action="/account/email")
    assert r.status_code == 422
    assert "Enter your current password" in r.get_data(as_text=True)
    r = submit(client, "/account", {"email": "ann.new@example.com",
                                    "current_password": "wrong password"},
               action="/account/email")
    assert r.status_code == 422
    assert not [m for m in outbox.messages() if m["To"] == "ann.new@example.com"]

    r = submit(client, "/account", {"email": "ann.new@example.com",
                                    "current_password": PASSWORD}, action="/account/email")
    assert r.status_code == 302
    assert stored(session, customer).email == "ann@example.com"
    assert stored(session, customer).pending_email == "ann.new@example.com"

    r = client.get(path_of(outbox.link("ann.new@example.com", "/account/email/")))
    assert r.status_code == 302
    assert stored(session, customer).email == "ann.new@example.com"
    assert stored(session, customer).pending_email is None
    assert "ann.new@example.com" in client.get("/account").get_data(as_text=True)
    assert log_in(client, "ann.new@example.com").status_code == 302


def test_change_email_with_a_confirmation_link_needs_no_password(client, outbox, session):
    make_customer(session)
    submit(client, "/link", {"email": "ann@example.com"})
    client.get(path_of(outbox.link("ann@example.com", "/m/")))
    submit(client, "/account", {}, action="/account/confirm")
    confirm = path_of(outbox.link("ann@example.com", "/account/confirm/"))
    submit(client, confirm, {})
    r = submit(client, "/account", {"email": "ann.other@example.com"}, action="/account/email")
    assert r.status_code == 302
    assert outbox.last("ann.other@example.com")


def test_change_email_to_a_taken_address_sends_nothing_and_does_not_tell(client, outbox,
                                                                         session):
    customer = make_customer(session)
    make_customer(session, "bob@example.com")
    log_in(client)
    r = submit(client, "/account", {"email": "bob@example.com", "current_password": PASSWORD},
               action="/account/email")
    assert r.status_code == 302
    assert [m["To"] for m in outbox.messages()] == []
    assert stored(session, customer).email == "ann@example.com"


def test_change_password(client, app, session):
    make_customer(session)
    log_in(client)
    elsewhere = app.test_client()
    log_in(elsewhere)
    r = submit(client, "/account", {"current_password": "wrong password",
                                    "password": "a fresh password", "confirm":
                                    "a fresh password"}, action="/account/password")
    assert r.status_code == 422
    r = submit(client, "/account", {"current_password": PASSWORD,
                                    "password": "a fresh password", "confirm":
                                    "a fresh password"}, action="/account/password")
    assert r.status_code == 302
    assert client.get("/account").status_code == 200  # this session goes on
    assert elsewhere.get("/account").status_code == 302  # the others end
    assert log_in(app.test_client()).status_code == 401
    assert log_in(app.test_client(), password="a fresh password").status_code == 302


# --- password hashes --------------------------------------------------------------------------


def test_passwords_are_hashed_with_argon2(client, session):
    submit(client, "/signup", {"email": "hash@example.com", "password": PASSWORD,
                               "confirm": PASSWORD})
    customer = session.scalars(select(Customer).where(Customer.email == "hash@example.com")
                               ).one()
    assert customer.password_hash.startswith("$argon2")
    assert PASSWORD not in customer.password_hash


def test_production_hashes_passwords_at_full_cost(production_password_cost):
    """The suite hashes at argon2's lowest cost (tests/conftest.py); production does not:
    argon2id with at least RFC 9106's low-memory parameters (64 MiB, 3 passes), and a hash
    made at a lower cost is made again at the next sign-in."""
    found = argon2.extract_parameters(accounts.passwords.hash(PASSWORD))
    assert found.type is argon2.Type.ID
    assert found.memory_cost >= RFC_9106_LOW_MEMORY.memory_cost  # KiB
    assert found.time_cost >= RFC_9106_LOW_MEMORY.time_cost
    weak = accounts.passwords.handler("argon2").using(
        rounds=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    ok, again = accounts.passwords.verify_and_update(PASSWORD, weak)
    assert ok and again is not None
    assert argon2.extract_parameters(again) == found


def test_the_suite_hashes_passwords_cheaply(session):
    customer = make_customer(session)
    assert argon2.extract_parameters(customer.password_hash).memory_cost == 8


def test_old_bcrypt_hash_is_upgraded_on_login(client, session):
    customer = make_customer(session)
    customer.password_hash = bcrypt.using(rounds=4).hash(PASSWORD)
    session.commit()
    assert stored(session, customer).password_hash.startswith("$2b$")
    assert log_in(client).status_code == 302
    upgraded = stored(session, customer).password_hash
    assert upgraded.startswith("$argon2")
    assert log_in(client).status_code == 302
