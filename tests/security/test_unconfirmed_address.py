"""Anyone can sign up with someone else's address. Until the address is confirmed, that
account may manage its own preferences, but not join the loyalty programme, add a wallet
card or subscribe the address to marketing email; the pages say why and offer to send the
confirmation link again. Once confirmed, all of it works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from portal import create_app
from portal.loyalty import ledger
from portal.models.consent import ConsentEvent
from portal.models.google_wallet import GoogleWalletObject
from portal.models.wallet import ApplePass
from portal.services import accounts
from portal.services.consent import current_states
from portal.wallet_ws.issuer import apple_wallet
from tests.conftest import Outbox, csrf_from, path_of, submit
from tests.integration.test_preferences import save
from tests.security.conftest import (
    PASSWORD,
    PROGRAM,
    full_config,
    make_person,
    signed_in_client,
)

VICTIM = "victim@example.com"
NOTICE = "Your email address is not confirmed yet"
RESEND = 'action="/account/verify/resend"'
assert PROGRAM is not None


def outbox_of(app: Flask) -> Outbox:
    return Outbox(Path(app.instance_path) / "outbox")


def subjects(app: Flask) -> list[str]:
    return [str(m["Subject"]) for m in outbox_of(app).messages()]


def email_state(session: Session, customer: Any, topic: str = "newsletter") -> str | None:
    session.expire_all()
    return current_states(session, customer).get((topic, "email"))


def join(client: FlaskClient) -> Any:
    return submit(client, "/loyalty", {"accept": "y",
                                       "terms_version": str(PROGRAM.terms.version)},
                  action="/loyalty/join")


def unconfirmed_member(session: Session, email: str, locale: str = "en") -> Any:
    """A member enrolled by a store (through the API) who never confirmed the address."""
    person = make_person(session, email)
    person.customer.email_verified_at = None
    person.customer.locale = locale
    session.commit()
    return person


def test_an_account_on_someone_elses_address_cannot_join_or_subscribe_it(app, session):
    client = app.test_client()
    assert submit(client, "/signup", {"email": VICTIM, "password": PASSWORD,
                                      "confirm": PASSWORD}).status_code == 200
    customer = accounts.find_by_email(session, VICTIM)
    assert customer is not None and customer.email_verified_at is None
    # The verification link went to the victim; the impostor signs in with the password.
    assert submit(client, "/login", {"email": VICTIM, "password": PASSWORD}).status_code == 302

    page = client.get("/loyalty").get_data(as_text=True)
    assert NOTICE in page and RESEND in page
    assert 'action="/loyalty/join"' not in page
    refused = join(client)
    assert refused.status_code == 403
    assert "Confirm your email address to join Carnet Rewards" in refused.get_data(as_text=True)
    assert ledger.member_for(session, customer) is None

    saved = save(client, on={"c:newsletter:email", "c:offers:sms"}, follow_redirects=True)
    html = saved.get_data(as_text=True)
    assert "Email subscriptions start once your email address is confirmed" in html
    assert "Your other choices are saved." in html and RESEND in html
    assert email_state(session, customer) is None            # neither granted nor pending
    assert current_states(session, customer)[("offers", "sms")] == "granted"  # their own
    assert subjects(app) == ["Confirm your email address"]   # no opt-in email to the victim
    assert not session.scalar(select(func.count()).select_from(ConsentEvent).where(
        ConsentEvent.customer_id == customer.id, ConsentEvent.channel == "email"))


def test_once_the_address_is_confirmed_joining_and_subscribing_work(app, session):
    customer = accounts.create_customer(session, VICTIM, locale="en")
    customer.password_hash = accounts.passwords.hash(PASSWORD)
    session.commit()
    client = signed_in_client(app, customer)
    # The first message was lost: the page sends a new one.
    resent = submit(client, "/preferences", {"next": "/loyalty"},
                    action="/account/verify/resend", follow_redirects=True)
    assert "We sent a new confirmation link to victim@example.com." in \
        resent.get_data(as_text=True)
    assert resent.request.path == "/loyalty"
    assert subjects(app) == ["Confirm your email address"]
    assert client.get(path_of(outbox_of(app).link(VICTIM, "/verify/"))).status_code == 302
    session.expire_all()
    assert customer.email_verified_at is not None

    page = client.get("/loyalty").get_data(as_text=True)
    assert NOTICE not in page
    assert join(client).status_code == 302
    assert ledger.member_for(session, customer) is not None
    save(client, on={"c:newsletter:email"})
    assert email_state(session, customer) == "pending"        # double opt-in, as for anyone
    assert subjects(app) == ["Confirm your email address", "Confirm your subscription"]
    # And nothing more to confirm.
    again = submit(client, "/preferences", {}, action="/account/verify/resend",
                   follow_redirects=True)
    assert "already confirmed" in again.get_data(as_text=True)
    assert len(subjects(app)) == 2


def test_an_unconfirmed_member_gets_no_wallet_card(app, session):
    person = unconfirmed_member(session, "lou@example.com")
    client = signed_in_client(app, person.customer)
    page = client.get("/loyalty").get_data(as_text=True)
    assert person.member.member_number in page                # the card itself is shown
    assert "apple.pkpass" not in page and "pay.google.com" not in page
    assert NOTICE in page and RESEND in page
    download = client.get("/loyalty/wallet/apple.pkpass")
    assert download.status_code == 302 and path_of(download.headers["Location"]) == "/loyalty"
    assert download.mimetype != "application/vnd.apple.pkpass"
    assert "Confirm your email address to add your card to a wallet" in \
        client.get("/loyalty").get_data(as_text=True)
    assert session.scalar(select(func.count()).select_from(ApplePass)) == 0
    assert session.scalar(select(func.count()).select_from(GoogleWalletObject)) == 0

    accounts.mark_email_verified(session, person.customer, "lou@example.com")
    session.commit()
    page = client.get("/loyalty").get_data(as_text=True)
    assert "apple.pkpass" in page and "pay.google.com" in page and NOTICE not in page
    card = client.get("/loyalty/wallet/apple.pkpass")
    assert card.status_code == 200 and card.mimetype == "application/vnd.apple.pkpass"


def test_the_messages_are_in_the_persons_language(app, session):
    person = unconfirmed_member(session, "lou@example.com", locale="fr")
    client = signed_in_client(app, person.customer)
    client.get("/loyalty/wallet/apple.pkpass")
    page = client.get("/loyalty").get_data(as_text=True)
    assert "Confirmez votre adresse e-mail pour ajouter votre carte à un portefeuille" in page
    assert "Renvoyer l’e-mail de confirmation" in page
    html = save(client, on={"c:events:email"}, follow_redirects=True).get_data(as_text=True)
    assert "Les abonnements par e-mail commencent une fois votre adresse e-mail confirmée" \
        in html


@pytest.fixture
def single_opt_in(connection, tmp_path, apple_paths, google_key):
    app = create_app(full_config(tmp_path, connection, apple_paths, google_key,
                                 EMAIL_DOUBLE_OPT_IN=False))
    yield app
    apple_wallet(app).close()


def test_without_double_opt_in_an_unconfirmed_address_is_not_granted_email(single_opt_in,
                                                                           session):
    customer = accounts.create_customer(session, VICTIM, locale="en")
    session.commit()
    client = signed_in_client(single_opt_in, customer)
    save(client, on={"c:newsletter:email"})
    assert email_state(session, customer) is None
    accounts.mark_email_verified(session, customer, VICTIM)
    session.commit()
    save(client, on={"c:newsletter:email"})
    assert email_state(session, customer) == "granted"


def test_sending_the_confirmation_again_is_rate_limited(app, session):
    app.config["LINK_RATE_LIMIT"] = "2/900"
    customer = accounts.create_customer(session, VICTIM, locale="en")
    session.commit()
    client = signed_in_client(app, customer)
    token = csrf_from(client.get("/preferences").get_data(as_text=True))
    for _ in range(3):
        last = client.post("/account/verify/resend", data={"csrf_token": token},
                           follow_redirects=True)
    assert "Too many attempts" in last.get_data(as_text=True)
    assert len(subjects(app)) == 2
