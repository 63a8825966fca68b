"""The consent ledger against a real Session: events, proofs, state and the change feed are
written together; the events table is append-only in the database itself."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError

from portal.core.db import utcnow
from portal.models.consent import ConsentEvent, ConsentProof, ConsentState
from portal.models.customer import Customer
from portal.outbox.models import Change
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import ConsentError, Proof, current_states, record_consent

PROOF = Proof("portal", "customer:test", "198.51.100.7", "TestBrowser/1.0")


@pytest.fixture
def customer(session):
    c = create_customer(session, "ledger@example.com")
    session.flush()
    return c


def count(session, model, **where):
    query = select(func.count()).select_from(model)
    for name, value in where.items():
        query = query.where(getattr(model, name) == value)
    return session.scalar(query)


def test_record_consent_writes_event_proof_state_and_change_together(session, customer):
    topic = get_catalog(session).get("offers")
    event = record_consent(session, customer, "offers", "sms", "granted", PROOF)
    session.flush()

    stored = session.get(ConsentEvent, event.id)
    assert (stored.topic_key, stored.channel, stored.state, stored.source, stored.actor) == (
        "offers", "sms", "granted", "portal", "customer:test")
    assert (stored.wording_version, stored.wording_hash) == (topic.wording_version,
                                                             topic.wording_hash)
    assert stored.proof_digest and len(stored.proof_digest) == 64
    proof = session.get(ConsentProof, event.id)
    assert (proof.ip, proof.user_agent) == ("198.51.100.7", "TestBrowser/1.0")
    state = session.get(ConsentState, (customer.id, "offers", "sms"))
    assert (state.state, state.event_id) == ("granted", event.id)
    change = session.scalars(select(Change).where(Change.customer_id == customer.id,
                                                  Change.type == "consent.changed")).one()
    assert change.data["event_id"] == event.id
    assert (change.data["topic"], change.data["channel"], change.data["state"]) == (
        "offers", "sms", "granted")

    # One transaction: rolling it back removes all four.
    customer_id, event_id = customer.id, event.id
    session.rollback()
    assert count(session, ConsentEvent, id=event_id) == 0
    assert count(session, ConsentProof, event_id=event_id) == 0
    assert count(session, ConsentState, customer_id=customer_id) == 0
    assert count(session, Change, customer_id=customer_id) == 0
    assert count(session, Customer, id=customer_id) == 0


def test_update_of_an_event_is_refused_by_the_database(session, customer):
    event = record_consent(session, customer, "offers", "sms", "granted", PROOF)
    session.flush()
    with pytest.raises(DBAPIError, match="append-only"), session.begin_nested():
        session.execute(update(ConsentEvent).where(ConsentEvent.id == event.id)
                        .values(state="withdrawn"))
    session.expire_all()
    assert session.get(ConsentEvent, event.id).state == "granted"


def test_delete_of_an_event_is_refused_by_the_database(session, customer):
    event = record_consent(session, customer, "offers", "sms", "granted", PROOF)
    session.flush()
    with pytest.raises(DBAPIError, match="append-only"), session.begin_nested():
        session.execute(delete(ConsentEvent).where(ConsentEvent.id == event.id))
    assert count(session, ConsentEvent, id=event.id) == 1


def test_orm_change_of_an_event_is_refused_too(session, customer):
    event = record_consent(session, customer, "offers", "sms", "granted", PROOF)
    session.flush()
    with pytest.raises(DBAPIError, match="append-only"), session.begin_nested():
        event.source = "import"
        session.flush()


def test_topic_star_expands_to_every_offered_channel(session, customer):
    catalog = get_catalog(session)
    event = record_consent(session, customer, "newsletter", "*", "granted", PROOF)
    session.flush()
    states = current_states(session, customer)
    assert {ch for (t, ch) in states if t == "newsletter"} == set(
        catalog.get("newsletter").channels)
    assert all(states[("newsletter", ch)] == "granted"
               for ch in catalog.get("newsletter").channels)
    assert session.get(ConsentState, (customer.id, "newsletter", "email")).event_id == event.id
    assert ("newsletter", "*") not in states
    # one event, not one per channel
    assert count(session, ConsentEvent, customer_id=customer.id) == 1


def test_switches_record_a_single_star_state(session, customer):
    record_consent(session, customer, "*", "*", "withdrawn", PROOF)
    record_consent(session, customer, "*", "sms", "withdrawn", PROOF)
    session.flush()
    states = current_states(session, customer)
    assert states == {("*", "*"): "withdrawn", ("*", "sms"): "withdrawn"}
    with pytest.raises(ConsentError) as raised:
        record_consent(session, customer, "*", "email", "pending", PROOF)
    assert raised.value.field == "state"


@pytest.mark.parametrize(("topic", "channel", "state", "field", "code"), [
    ("unknown_topic", "email", "granted", "topic", "unknown_topic"),
    ("offers", "carrier_pigeon", "granted", "channel", "unknown_channel"),
    ("newsletter", "sms", "granted", "channel", "channel_not_offered"),
    ("account", "email", "withdrawn", "topic", "required_topic"),
    ("account", "*", "withdrawn", "topic", "required_topic"),
    ("offers", "email", "maybe", "state", "invalid_consent"),
])
def test_invalid_choices_raise_consent_error_naming_the_field(session, customer, topic, channel,
                                                              state, field, code):
    with pytest.raises(ConsentError) as raised:
        record_consent(session, customer, topic, channel, state, PROOF)
    assert raised.value.field == field
    assert raised.value.code == code
    assert count(session, ConsentEvent, customer_id=customer.id) == 0


def test_unknown_source_and_erased_customer_are_refused(session, customer):
    with pytest.raises(ConsentError) as raised:
        record_consent(session, customer, "offers", "email", "granted",
                       Proof("carrier_pigeon", "x"))
    assert raised.value.field == "source"
    customer.erased_at = utcnow()
    with pytest.raises(ConsentError) as raised:
        record_consent(session, customer, "offers", "email", "granted", PROOF)
    assert raised.value.code == "erased"


def test_required_topic_can_be_granted(session, customer):
    record_consent(session, customer, "account", "email", "granted", PROOF)
    assert current_states(session, customer)[("account", "email")] == "granted"


def test_a_later_event_wins_the_state(session, customer):
    first = record_consent(session, customer, "offers", "email", "granted", PROOF)
    second = record_consent(session, customer, "offers", "email", "withdrawn", PROOF)
    session.flush()
    state = session.get(ConsentState, (customer.id, "offers", "email"))
    assert (state.state, state.event_id) == ("withdrawn", second.id)
    third = record_consent(session, customer, "offers", "email", "granted", PROOF)
    session.flush()
    session.expire_all()
    state = session.get(ConsentState, (customer.id, "offers", "email"))
    assert (state.state, state.event_id) == ("granted", third.id)
    assert first.id < second.id < third.id


def test_a_backdated_event_does_not_overwrite_a_newer_choice(session, customer):
    """An import of an old paper form must not undo a withdrawal made since."""
    now = utcnow()
    withdrawn = record_consent(session, customer, "offers", "postal", "withdrawn", PROOF, at=now)
    record_consent(session, customer, "offers", "postal", "granted",
                   Proof("paper", "import:batch-1"), at=now - timedelta(days=30))
    session.flush()
    session.expire_all()
    state = session.get(ConsentState, (customer.id, "offers", "postal"))
    assert (state.state, state.event_id) == ("withdrawn", withdrawn.id)
    assert count(session, ConsentEvent, customer_id=customer.id) == 2  # both kept as history


def test_older_wording_version_is_recorded_when_given(session, customer):
    topic = get_catalog(session).get("offers")
    event = record_consent(session, customer, "offers", "email", "granted", PROOF,
                           wording_version=topic.wording_version)
    assert event.wording_version == topic.wording_version
    with pytest.raises(ConsentError) as raised:
        record_consent(session, customer, "offers", "email", "granted", PROOF,
                       wording_version=topic.wording_version + 99)
    assert raised.value.field == "wording_version"
