"""What an old emailed link, or a copied cookie, can still do: a manage link opens the
preferences only; sensitive changes take the password or a single-use confirmation link;
verification links work once; a change of address ends every earlier link and session and
tells the old address, which may take the account back; sessions live on the server and end
at sign out, everywhere on request, and when idle."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update

from portal import create_app
from portal.core.db import utcnow
from portal.models.customer import Customer, SignInSession
from portal.outbox.models import Change
from portal.outbox.worker import run_once
from portal.services import accounts
from portal.web import links
from tests.conftest import app_config, csrf_from, path_of, submit

PASSWORD = "correct horse 1"
NEW_PASSWORD = "a brand new secret"


def make_customer(session, email="ann@example.com", password=PASSWORD):
    customer = accounts.create_customer(session, email, password=password)
    accounts.mark_email_verified(session, customer, email)
    session.commit()
    return customer


def log_in(client, email="ann@example.com", password=PASSWORD):
    return submit(client, "/login", {"email": email, "password": password})


def manage_path(app, customer):
    with app.test_request_context():
        return path_of(links.manage_link(customer))


def by_manage_link(app, customer):
    client = app.test_client()
    assert client.get(manage_path(app, customer)).status_code == 302
    return client


def stored(session, customer):
    session.expire_all()
    return session.get(Customer, customer.id)


def signed_in(client) -> bool:
    return client.get("/preferences").status_code == 200


def sessions_of(session, customer):
    session.expire_all()
    return session.scalars(select(SignInSession).where(
        SignInSession.customer_id == customer.id).order_by(SignInSession.id)).all()


def cookie_of(client) -> str:
    cookie = client.get_cookie("carnet_session")
    assert cookie is not None
    return cookie.value


def ask_for_confirmation(client, outbox, page="/account", back="settings"):
    r = submit(client, page, {"next": back}, action="/account/confirm")
    assert r.status_code == 302
    return path_of(outbox.link("ann@example.com", "/account/confirm/"))


# --- Finding A: a manage link opens the preferences only -----------------------------------------


def test_a_manage_link_opens_preferences_but_cannot_change_credentials_or_data(
        app, session, outbox):
    customer = make_customer(session)
    client = by_manage_link(app, customer)
    assert client.get("/preferences").status_code == 200
    assert client.get("/preferences/history").status_code == 200
    assert client.get("/account").status_code == 200

    r = submit(client, "/account", {"email": "mallory@example.com"}, action="/account/email")
    assert r.status_code == 422
    assert "Enter your current password" in r.get_data(as_text=True)
    r = submit(client, "/account", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
               action="/account/password")
    assert r.status_code == 422
    r = submit(client, "/account", {}, action="/account/export")
    assert r.status_code == 422
    assert r.mimetype == "text/html"
    r = submit(client, "/account/delete", {"confirm": "y"})
    assert r.status_code == 422

    now = stored(session, customer)
    assert (now.email, now.pending_email, now.erased_at) == ("ann@example.com", None, None)
    assert accounts.verify_password(now, PASSWORD)
    assert not [m for m in outbox.messages() if m["To"] == "mallory@example.com"]


def test_the_manage_link_stays_preferences_only_however_fresh(app, session):
    """Followed seconds ago, it still cannot change the address (it used to, for 15 minutes)."""
    customer = make_customer(session)
    client = by_manage_link(app, customer)
    r = submit(client, "/account", {"email": "mallory@example.com"}, action="/account/email")
    assert r.status_code == 422
    assert stored(session, customer).pending_email is None


def test_a_confirmation_link_works_once_and_allows_changes_for_15_minutes(app, session, outbox):
    customer = make_customer(session)
    client = by_manage_link(app, customer)
    page = client.get("/account").get_data(as_text=True)
    assert "Email me a confirmation link" in page
    link = ask_for_confirmation(client, outbox)

    # Opening the link (a mail scanner would) shows a button and changes nothing.
    assert client.get(link).status_code == 200
    assert client.get(link).status_code == 200
    html = client.get(link).get_data(as_text=True)
    r = client.post(link, data={"csrf_token": csrf_from(html)})
    assert r.status_code == 302
    assert path_of(r.headers["Location"]) == "/account"
    assert "without your password" in client.get("/account").get_data(as_text=True)

    r = submit(client, "/account", {"email": "ann.new@example.com"}, action="/account/email")
    assert r.status_code == 302
    assert stored(session, customer).pending_email == "ann.new@example.com"

    # Once only: neither a second visit nor another browser gets anything from it.
    again = client.get(link)
    assert again.status_code == 400
    assert "already used" in again.get_data(as_text=True)
    other = app.test_client()
    assert other.get(link).status_code == 400
    assert not signed_in(other)

    # Fifteen minutes later the session is back to preferences only.
    [row] = sessions_of(session, customer)
    session.execute(update(SignInSession).where(SignInSession.id == row.id).values(
        created_at=utcnow() - timedelta(minutes=16)))
    session.commit()
    r = submit(client, "/account", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
               action="/account/password")
    assert r.status_code == 422
    assert accounts.verify_password(stored(session, customer), PASSWORD)


def test_a_confirmation_link_from_the_delete_page_leads_back_to_it(app, session, outbox):
    customer = make_customer(session)
    client = by_manage_link(app, customer)
    link = ask_for_confirmation(client, outbox, page="/account/delete", back="delete")
    html = client.get(link).get_data(as_text=True)
    r = client.post(link, data={"csrf_token": csrf_from(html)})
    assert path_of(r.headers["Location"]) == "/account/delete"
    assert submit(client, "/account/delete", {"confirm": "y"}).status_code == 200
    assert stored(session, customer).erased_at is not None


def test_a_verification_link_works_once(app, session, outbox):
    first = app.test_client()
    submit(first, "/signup", {"email": "ann@example.com", "password": PASSWORD,
                              "confirm": PASSWORD})
    link = path_of(outbox.link("ann@example.com", "/verify/"))
    assert first.get(link).status_code == 302
    assert signed_in(first)

    second = app.test_client()
    r = second.get(link)
    assert r.status_code == 400
    assert "already used" in r.get_data(as_text=True)
    assert not signed_in(second)
    french = app.test_client().get(link, headers={"Accept-Language": "fr"})
    assert french.status_code == 400
    assert "déjà été utilisé" in french.get_data(as_text=True)


# --- Finding A: a change of address ends the old links and tells the old address ---------------


def change_address(client, outbox, new="ann.new@example.com"):
    r = submit(client, "/account", {"email": new, "current_password": PASSWORD},
               action="/account/email")
    assert r.status_code == 302
    r = client.get(path_of(outbox.link(new, "/account/email/")))
    assert r.status_code == 302


def test_a_change_of_address_ends_old_links_and_sessions_and_can_be_undone(app, session,
                                                                          outbox):
    customer = make_customer(session)
    epoch = customer.auth_epoch
    old_manage = manage_path(app, customer)
    elsewhere = app.test_client()
    log_in(elsewhere)
    copied = app.test_client()
    assert copied.get(old_manage).status_code == 302
    changes_before = session.scalar(select(func.count()).select_from(Change).where(
        Change.customer_id == customer.id, Change.type == "customer.updated"))

    client = app.test_client()
    log_in(client)
    change_address(client, outbox)
    assert stored(session, customer).email == "ann.new@example.com"
    assert stored(session, customer).auth_epoch == epoch + 1
    assert signed_in(client)  # the browser that confirmed goes on
    assert not signed_in(elsewhere)
    assert not signed_in(copied)
    assert app.test_client().get(old_manage).status_code == 400
    assert session.scalar(select(func.count()).select_from(Change).where(
        Change.customer_id == customer.id, Change.type == "customer.updated")
    ) == changes_before + 1

    notice = outbox.last("ann@example.com")
    assert notice["Subject"] == "The email address of your Carnet account was changed"
    body = notice.get_body(preferencelist=("plain",)).get_content()
    assert "a•••@example.com" in body and "ann.new@example.com" not in body
    undo = path_of(outbox.link("ann@example.com", "/account/email/undo/"))

    owner = app.test_client()
    page = owner.get(undo)
    assert page.status_code == 200
    assert stored(session, customer).email == "ann.new@example.com"  # GET changes nothing
    r = owner.post(undo, data={"csrf_token": csrf_from(page.get_data(as_text=True))})
    assert r.status_code == 302
    back = stored(session, customer)
    assert back.email == "ann@example.com"
    assert back.auth_epoch == epoch + 2
    assert not signed_in(client)  # whoever made the change is out
    assert signed_in(owner)
    # The owner may now choose a new password without the old one (which the other knew).
    r = submit(owner, "/account", {"password": NEW_PASSWORD, "confirm": NEW_PASSWORD},
               action="/account/password")
    assert r.status_code == 302
    assert log_in(app.test_client(), password=NEW_PASSWORD).status_code == 302

    assert owner.get(undo).status_code == 400  # once only
    assert session.scalar(select(func.count()).select_from(Change).where(
        Change.customer_id == customer.id, Change.type == "customer.updated")
    ) == changes_before + 2


def test_undo_never_takes_an_address_another_account_now_has(app, session, outbox):
    customer = make_customer(session)
    client = app.test_client()
    log_in(client)
    change_address(client, outbox)
    undo = path_of(outbox.link("ann@example.com", "/account/email/undo/"))
    make_customer(session, "ann@example.com")  # someone else signs up with the old address
    owner = app.test_client()
    html = owner.get(undo).get_data(as_text=True)
    r = owner.post(undo, data={"csrf_token": csrf_from(html)})
    assert r.status_code == 400
    assert "belongs to another account" in r.get_data(as_text=True)
    assert stored(session, customer).email == "ann.new@example.com"


def test_a_pending_change_of_address_dies_with_a_new_password(app, session, outbox):
    customer = make_customer(session)
    client = app.test_client()
    log_in(client)
    submit(client, "/account", {"email": "mallory@example.com", "current_password": PASSWORD},
           action="/account/email")
    confirm = path_of(outbox.link("mallory@example.com", "/account/email/"))
    submit(client, "/account", {"current_password": PASSWORD, "password": NEW_PASSWORD,
                                "confirm": NEW_PASSWORD}, action="/account/password")
    assert app.test_client().get(confirm).status_code == 400
    assert stored(session, customer).email == "ann@example.com"


# --- Finding B: sessions kept on the server -----------------------------------------------------


def test_after_sign_out_a_copied_cookie_is_refused(app, session):
    customer = make_customer(session)
    client = app.test_client()
    log_in(client)
    cookie = cookie_of(client)
    assert len(sessions_of(session, customer)) == 1
    assert submit(client, "/preferences", {}, action="/logout").status_code == 302

    thief = app.test_client()
    thief.set_cookie("carnet_session", cookie)
    r = thief.get("/preferences")
    assert r.status_code == 302
    assert path_of(r.headers["Location"]).startswith("/login")
    assert sessions_of(session, customer) == []


def test_the_account_page_lists_sessions_and_signs_out_everywhere_else(app, session):
    customer = make_customer(session)
    phone = app.test_client()
    log_in(phone)
    laptop = app.test_client()
    submit(laptop, "/login", {"email": "ann@example.com", "password": PASSWORD},
           headers={"User-Agent": "Laptop/1.0 " + "x" * 500})
    html = laptop.get("/account", headers={"User-Agent": "Laptop/1.0"}).get_data(as_text=True)
    assert "Where you are signed in" in html
    assert html.count("this browser") == 1
    assert "Laptop/1.0 " + "x" * 189 in html and "x" * 200 not in html  # kept short

    r = submit(laptop, "/account", {}, action="/account/sessions/end-others")
    assert r.status_code == 302
    assert not signed_in(phone)
    assert signed_in(laptop)
    assert len(sessions_of(session, customer)) == 1


def test_one_session_can_be_signed_out_and_only_its_owners(app, session):
    ann = make_customer(session)
    bob = make_customer(session, "bob@example.com")
    laptop, phone, bobs = app.test_client(), app.test_client(), app.test_client()
    log_in(laptop)
    log_in(phone)
    log_in(bobs, "bob@example.com")
    phone_row = sessions_of(session, ann)[-1]
    [bob_row] = sessions_of(session, bob)

    submit(laptop, "/account", {}, action=f"/account/sessions/{bob_row.id}/end")
    assert signed_in(bobs)
    submit(laptop, "/account", {}, action=f"/account/sessions/{phone_row.id}/end")
    assert not signed_in(phone)
    assert signed_in(laptop)


def test_a_new_password_ends_every_other_session_row(app, session):
    customer = make_customer(session)
    other = app.test_client()
    log_in(other)
    stolen = cookie_of(other)
    client = app.test_client()
    log_in(client)
    submit(client, "/account", {"current_password": PASSWORD, "password": NEW_PASSWORD,
                                "confirm": NEW_PASSWORD}, action="/account/password")
    assert len(sessions_of(session, customer)) == 1
    thief = app.test_client()
    thief.set_cookie("carnet_session", stolen)
    assert not signed_in(thief)
    assert signed_in(client)


def test_an_idle_session_ends_and_activity_is_written_once_a_minute(connection, tmp_path,
                                                                    session):
    customer = make_customer(session)
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, SESSION_IDLE_MINUTES=5))
    client = app.test_client()
    log_in(client)
    [row] = sessions_of(session, customer)

    def set_last_seen(ago):
        session.execute(update(SignInSession).where(SignInSession.id == row.id).values(
            last_seen_at=utcnow() - ago))
        session.commit()
        return sessions_of(session, customer)[0].last_seen_at

    seen = set_last_seen(timedelta(seconds=30))
    assert signed_in(client)
    assert sessions_of(session, customer)[0].last_seen_at == seen  # not written again

    seen = set_last_seen(timedelta(minutes=4))
    assert signed_in(client)
    assert sessions_of(session, customer)[0].last_seen_at > seen + timedelta(minutes=3)

    set_last_seen(timedelta(minutes=6))
    r = client.get("/preferences")
    assert r.status_code == 302
    assert path_of(r.headers["Location"]).startswith("/login")
    assert sessions_of(session, customer) == []


def test_a_session_ends_31_days_after_a_password_sign_in_however_active(app, session):
    customer = make_customer(session)
    client = app.test_client()
    log_in(client)
    session.execute(update(SignInSession).where(SignInSession.customer_id == customer.id)
                    .values(created_at=utcnow() - timedelta(days=32)))
    session.commit()
    assert not signed_in(client)


def test_the_worker_forgets_sessions_that_ended_by_themselves(app, session):
    """A customer who never comes back does not keep user agents on file until erasure."""
    customer = make_customer(session)
    idle, fresh = app.test_client(), app.test_client()
    log_in(idle, password=PASSWORD)
    log_in(fresh, password=PASSWORD)
    first = min(row.id for row in sessions_of(session, customer))
    session.execute(update(SignInSession).where(SignInSession.id == first)
                    .values(last_seen_at=utcnow() - timedelta(days=8)))
    session.commit()
    assert run_once(app, ["sessions.purge"]) == {"sessions.purge": 1}
    assert [row.id for row in sessions_of(session, customer)] != [first]
    assert len(sessions_of(session, customer)) == 1
    assert signed_in(fresh)


def test_erasure_deletes_the_session_rows(app, session):
    customer = make_customer(session)
    other = app.test_client()
    log_in(other)
    client = app.test_client()
    log_in(client)
    r = submit(client, "/account/delete", {"confirm": "y", "current_password": PASSWORD})
    assert r.status_code == 200
    assert sessions_of(session, customer) == []
    assert not signed_in(other)


def test_account_security_pages_in_french(app, session, outbox):
    customer = make_customer(session)
    client = by_manage_link(app, customer)
    html = client.get("/account", headers={"Accept-Language": "fr"}).get_data(as_text=True)
    assert "Où vous êtes connecté" in html
    assert "M’envoyer un lien de confirmation" in html
