"""One address, one customer: a fullwidth or otherwise compatibility-encoded address is the
plain one (NFKC), and an address that only differs from an existing one by look-alike letters
of another script is refused at sign-up instead of becoming a second customer."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from portal.models.customer import Customer
from portal.services import accounts
from portal.services.lookalikes import skeleton
from tests.conftest import submit
from tests.support.api_client import Api

PASSWORD = "correct horse 1"
FULLWIDTH = "ｄｅｍｏ@ｅｘａｍｐｌｅ.com"  # NFKC: demo@example.com
CYRILLIC_E = "d\u0435mo@example.com"  # е (U+0435), not e
GREEK_O = "dem\u03bf@example.com"  # ο (U+03BF), not o
CYRILLIC_DOMAIN = "demo@ex\u0430mple.com"  # а (U+0430), not a


def customers(session) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(Customer)) or 0


@pytest.fixture
def demo(session):
    customer = accounts.create_customer(session, "demo@example.com", password=PASSWORD,
                                        locale="en")
    accounts.mark_email_verified(session, customer, "demo@example.com")
    session.commit()
    return customer


def sign_up(client, email, **headers):
    return submit(client, "/signup", {"email": email, "password": PASSWORD, "confirm": PASSWORD},
                  headers=headers)


@pytest.mark.parametrize("raw", [FULLWIDTH, "ＤＥＭＯ＠example.com", " Demo@Example.COM ",
                                 "\U0001d41d\U0001d41e\U0001d426\U0001d428@example.com"])
def test_compatibility_forms_normalize_to_the_plain_address(raw):
    assert accounts.normalize_email(raw) == "demo@example.com"


def test_skeletons_fold_look_alike_letters_only():
    for lookalike in (CYRILLIC_E, GREEK_O, CYRILLIC_DOMAIN):
        assert lookalike != "demo@example.com"
        assert skeleton(lookalike) == "demo@example.com"
    assert skeleton("straße@example.com") == "straße@example.com"
    assert skeleton("léa@example.com") == "léa@example.com"


def test_signing_up_with_a_fullwidth_address_is_the_existing_account(client, session, outbox,
                                                                     demo):
    before = customers(session)
    response = sign_up(client, FULLWIDTH)
    assert response.status_code == 200  # the same answer as for any known address
    assert customers(session) == before
    assert outbox.last()["To"] == "demo@example.com"  # its owner is told, nobody else


@pytest.mark.parametrize("lookalike", [CYRILLIC_E, GREEK_O, CYRILLIC_DOMAIN])
def test_a_look_alike_address_is_refused_at_sign_up(client, session, outbox, demo, lookalike):
    before = customers(session)
    response = sign_up(client, lookalike)
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "An account with a similar-looking address already exists." in html
    assert "demo@example.com" not in html  # which account is not said
    assert customers(session) == before
    assert outbox.messages() == []


def test_the_refusal_is_in_french_for_french_speakers(client, demo):
    response = sign_up(client, CYRILLIC_E, **{"Accept-Language": "fr"})
    assert response.status_code == 422
    assert "ressemble à s’y méprendre" in response.get_data(as_text=True)


def test_a_plain_address_is_never_refused_for_resembling_a_look_alike(client, session, outbox):
    squatter = accounts.create_customer(session, CYRILLIC_E, locale="en")
    session.commit()
    assert squatter.email == CYRILLIC_E
    response = sign_up(client, "demo@example.com")
    assert response.status_code == 200
    assert outbox.last()["To"] == "demo@example.com"


def test_an_unrelated_non_latin_address_signs_up(client, session, demo):
    before = customers(session)
    assert sign_up(client, "иван@example.com").status_code == 200
    assert customers(session) == before + 1


def test_logging_in_with_a_fullwidth_address_and_its_rate_limit_count(app, client, demo):
    response = submit(client, "/login", {"email": FULLWIDTH, "password": PASSWORD})
    assert response.status_code == 302
    # Every spelling of the address counts against the same limit.
    app.config["LOGIN_RATE_LIMIT"] = "4/300"  # the sign-in above counted once
    other = app.test_client()
    spellings = ["demo@example.com", FULLWIDTH, "ＤＥＭＯ＠example.com"]
    for spelling in spellings:
        assert submit(other, "/login", {"email": spelling, "password": "wrong password"}
                      ).status_code == 401
    refused = submit(other, "/login", {"email": " Ｄemo@example.com", "password": PASSWORD})
    assert refused.status_code == 429


def test_the_api_normalizes_and_refuses_look_alikes(app, client, session, demo):
    api = Api(app, client)
    found = api.get("/customers/lookup", query_string={"email": FULLWIDTH})
    assert found.status_code == 200 and found.get_json()["id"] == demo.public_id
    decided = api.post("/decisions", {"customer": {"email": FULLWIDTH}, "topic": "account",
                                      "channel": "email"})
    assert decided.get_json()["reason"] != "unknown_customer"
    taken = api.post("/customers", {"email": FULLWIDTH})
    assert taken.status_code == 409
    lookalike = api.post("/customers", {"email": CYRILLIC_E})
    assert lookalike.status_code == 409
    assert lookalike.get_json()["errors"][0] == {
        "field": "email", "code": "email_lookalike",
        "message": "this email differs from another customer's only by look-alike letters"}
    moved = api.put("/customers/external/shop/42", {"email": GREEK_O})
    assert moved.status_code == 409
    fine = api.post("/customers", {"email": "other@example.com"})
    assert fine.status_code == 201
    again = api.put(f"/customers/external/shop/{fine.get_json()['id']}",
                    {"email": "ＯＴＨＥＲ@example.com"})
    assert again.status_code == 200 and again.get_json()["email"] == "other@example.com"
