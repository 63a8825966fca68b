"""Web push services against a real Session: input checks, device choices and how they join an
account, the contact resolver, fan-out through the precedence, and delivery bookkeeping."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from portal.core.db import utcnow
from portal.models.consent import ConsentEvent, ConsentState, Dispatch
from portal.push import messages as push_messages
from portal.push import subscriptions as push
from portal.push.models import PushDelivery, PushSubscription
from portal.push.webpush import MAX_PAYLOAD_BYTES, PushOutcome
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.decisions import CONTACT_RESOLVERS, decide_many
from tests.support.fake_push_service import make_fake_subscription

PROOF = Proof("web_push", "test", "203.0.113.9", "Firefox")
ORIGIN = "https://push.example.net"


@pytest.fixture
def catalog(session):
    return get_catalog(session)


@pytest.fixture(autouse=True)
def resolver(monkeypatch):
    monkeypatch.setitem(CONTACT_RESOLVERS, "web_push", push.resolve_contacts)


def subscribe(session, *, customer=None, device="dev-1", origin=ORIGIN):
    raw, _ = make_fake_subscription(origin)
    data = push.check_subscription(raw, allow_http=origin.startswith("http:"))
    sub, created = push.save_subscription(
        session, data, customer=customer, device_hash=None if customer else push.sha256(device),
        user_agent="Firefox", locale="en")
    assert created
    return sub


def customer_state(session, customer, topic):
    row = session.get(ConsentState, (customer.id, topic, "web_push"))
    return row.state if row else None


# --- input -------------------------------------------------------------------------------------


def test_subscription_input_is_checked_before_storing():
    raw, _ = make_fake_subscription(ORIGIN)
    assert push.check_subscription(raw, allow_http=False).endpoint == raw["endpoint"]
    plain, _ = make_fake_subscription("http://push.example.net:8080")
    with pytest.raises(push.PushInputError) as exc:
        push.check_subscription(plain, allow_http=False)
    assert (exc.value.code, exc.value.field) == ("invalid_subscription", "subscription.endpoint")
    assert push.check_subscription(plain, allow_http=True)
    bad_keys = {**raw, "keys": {"p256dh": "AAAA", "auth": raw["keys"]["auth"]}}
    with pytest.raises(push.PushInputError) as exc:
        push.check_subscription(bad_keys, allow_http=False)
    assert exc.value.field == "subscription.keys"
    with pytest.raises(push.PushInputError) as exc:
        push.check_subscription({**raw, "endpoint": ORIGIN + "/" + "a" * 3000}, allow_http=False)
    assert exc.value.code == "too_long"
    with pytest.raises(push.PushInputError):
        push.check_subscription("not an object", allow_http=False)


@pytest.mark.parametrize(("endpoint", "reason"), [
    ("https://127.0.0.1/p", "private_address"),
    ("https://169.254.169.254/latest", "private_address"),
    ("https://[::1]/p", "private_address"),
    ("https://2130706433/p", "private_address"),
    ("https://[::ffff:192.168.1.1]/p", "private_address"),
    ("https://localhost/p", "reserved_name"),
    ("https://printer.local/p", "reserved_name"),
    ("https://push.example.net:25/p", "port"),
])
def test_endpoints_on_private_networks_are_refused_before_storing(endpoint, reason):
    raw = {**make_fake_subscription(ORIGIN)[0], "endpoint": endpoint}
    with pytest.raises(push.PushInputError) as exc:
        push.check_subscription(raw, allow_http=False)
    assert (exc.value.code, exc.value.field, exc.value.reason) == (
        "refused_destination", "subscription.endpoint", reason)
    if reason != "port":  # the setting lifts the address and name rules, not the port rule
        assert push.check_subscription(raw, allow_http=False, allow_private=True)


def test_topics_must_be_offered_on_web_push(catalog):
    assert push.check_topics(["offers", "newsletter", "offers"], catalog) == ["offers",
                                                                               "newsletter"]
    for topics, code, field in [
        (["nope"], "unknown_topic", "topics[0]"),
        (["offers", "surveys"], "channel_not_offered", "topics[1]"),
        ("offers", "type", "topics"),
        ([1], "type", "topics[0]"),
    ]:
        with pytest.raises(push.PushInputError) as exc:
            push.check_topics(topics, catalog)
        assert (exc.value.code, exc.value.field) == (code, field)


# --- choices -----------------------------------------------------------------------------------


def test_device_choices_are_consent_events_without_a_customer(session, catalog):
    sub = subscribe(session)
    assert push.set_topics(session, catalog, sub, None, ["offers", "events"], PROOF) == 2
    assert push.set_topics(session, catalog, sub, None, ["offers", "events"], PROOF) == 0
    assert push.set_topics(session, catalog, sub, None, ["events"], PROOF) == 1
    events = session.scalars(select(ConsentEvent).where(
        ConsentEvent.push_subscription_id == sub.id).order_by(ConsentEvent.id)).all()
    assert [(e.topic_key, e.state, e.customer_id, e.source) for e in events] == [
        ("offers", "granted", None, "web_push"), ("events", "granted", None, "web_push"),
        ("offers", "withdrawn", None, "web_push")]
    assert all(e.wording_version == catalog.get(e.topic_key).wording_version for e in events)
    assert push.chosen_topics(session, catalog, sub, None) == ["events"]


# device state, customer state before, customer state after, events recorded
MERGE_TABLE = [
    ("withdrawn", "granted", "withdrawn", 1),
    ("withdrawn", None, "withdrawn", 1),
    ("granted", None, "granted", 1),
    ("granted", "withdrawn", "withdrawn", 0),
    ("granted", "granted", "granted", 0),
    ("withdrawn", "withdrawn", "withdrawn", 0),
]


@pytest.mark.parametrize("device, before, after, recorded", MERGE_TABLE)
def test_sign_in_merges_device_choices_most_restrictive_first(session, catalog, device, before,
                                                               after, recorded):
    customer = create_customer(session, "merge@example.com")
    if before:
        record_consent(session, customer, "offers", "web_push", before,
                       Proof("portal", "test"), catalog=catalog)
    sub = subscribe(session)
    offers = catalog.get("offers")
    push.record_device_choice(session, sub, offers, "granted", PROOF)
    if device == "withdrawn":
        push.record_device_choice(session, sub, offers, "withdrawn", PROOF)
    count = push.adopt_device(session, catalog, customer, [sub], PROOF)
    assert count == recorded
    assert customer_state(session, customer, "offers") == after
    assert sub.customer_id == customer.id
    if recorded:
        event = session.scalars(select(ConsentEvent).where(
            ConsentEvent.customer_id == customer.id).order_by(ConsentEvent.id.desc())).first()
        assert (event.source, event.state) == ("web_push", after)
    # Adopting again changes nothing: the subscription is the customer's now.
    assert push.adopt_device(session, catalog, customer, [sub], PROOF) == 0


def test_two_devices_one_withdrawn_one_granted_gives_withdrawn(session, catalog):
    customer = create_customer(session, "two@example.com")
    first, second = subscribe(session), subscribe(session)
    push.record_device_choice(session, first, catalog.get("events"), "granted", PROOF)
    push.record_device_choice(session, second, catalog.get("events"), "withdrawn", PROOF)
    push.adopt_device(session, catalog, customer, [first, second], PROOF)
    assert customer_state(session, customer, "events") == "withdrawn"


def test_customer_reachable_on_web_push_only_with_an_active_subscription(session, catalog):
    customer = create_customer(session, "reach@example.com")
    record_consent(session, customer, "offers", "web_push", "granted", PROOF, catalog=catalog)
    ask = [(customer, "offers", "web_push")]
    assert decide_many(session, catalog, ask, utcnow())[0].reason == "no_contact_point"
    sub = subscribe(session, customer=customer)
    decision = decide_many(session, catalog, ask, utcnow())[0]
    assert decision.allowed and decision.contact == {"web_push_subscriptions": 1}
    push.leave(session, sub.endpoint)
    assert decide_many(session, catalog, ask, utcnow())[0].reason == "no_contact_point"


# --- messages ---------------------------------------------------------------------------------


def message_data(**extra):
    return {"topic": "offers", "audience": "all", "title": "Sale", "body": "Half price",
            "ttl": 3600, **extra}


def test_payload_size_is_checked_before_queuing(session, catalog):
    with pytest.raises(push_messages.MessageError) as exc:
        push_messages.create_message(session, catalog, message_data(body="x" * 3990),
                                     api_key_id=None)
    assert exc.value.code == "payload_too_large" and exc.value.field == "body"
    with pytest.raises(push_messages.MessageError) as exc:
        push_messages.create_message(
            session, catalog, message_data(localized={"fr": {"body": "é" * 2000}}),
            api_key_id=None)
    assert exc.value.field == "localized.fr"
    # Just below the limit is accepted: the limit is the encoded JSON, not the text.
    fits = message_data(body="")
    probe = push_messages.create_message(session, catalog, fits, api_key_id=None)
    room = MAX_PAYLOAD_BYTES - len(push_messages.payload(probe, None))
    ok = push_messages.create_message(session, catalog, message_data(body="b" * room),
                                      api_key_id=None)
    assert len(push_messages.payload(ok, None)) == MAX_PAYLOAD_BYTES


def test_language_variant_falls_back_field_by_field(session, catalog):
    message = push_messages.create_message(
        session, catalog, message_data(url="/offers", localized={"fr": {"title": "Soldes"}}),
        api_key_id=None)
    assert push_messages.variant(message, "fr_CA") == {
        "title": "Soldes", "body": "Half price", "url": "/offers", "icon": None}
    assert push_messages.variant(message, "de")["title"] == "Sale"


def test_topic_must_be_offered_on_web_push(session, catalog):
    with pytest.raises(push_messages.MessageError) as exc:
        push_messages.create_message(session, catalog, message_data(topic="surveys"),
                                     api_key_id=None)
    assert exc.value.code == "channel_not_offered"


def test_fan_out_decides_customers_and_devices_by_the_same_rules(session, catalog):
    now = utcnow()
    granted = create_customer(session, "yes@example.com")
    paused = create_customer(session, "paused@example.com")
    silent = create_customer(session, "silent@example.com")
    for c in (granted, paused):
        record_consent(session, c, "offers", "web_push", "granted", PROOF, catalog=catalog)
    record_consent(session, paused, "*", "*", "withdrawn", PROOF, catalog=catalog)
    subs = {c.email: subscribe(session, customer=c) for c in (granted, paused, silent)}
    device_yes, device_no = subscribe(session), subscribe(session, device="dev-2")
    push.record_device_choice(session, device_yes, catalog.get("offers"), "granted", PROOF)
    push.record_device_choice(session, device_no, catalog.get("offers"), "withdrawn", PROOF)
    gone = subscribe(session)
    push.record_device_choice(session, gone, catalog.get("offers"), "granted", PROOF)
    push.expire_endpoint(session, gone.endpoint, "gone")

    message = push_messages.create_message(session, catalog, message_data(), api_key_id=None)
    while push_messages.fan_out_batch(session, catalog, message.id, now, batch=2):
        pass
    rows = {d.subscription_id: (d.status, d.reason) for d in session.scalars(
        select(PushDelivery).where(PushDelivery.message_id == message.id))}
    assert rows == {
        subs["yes@example.com"].id: ("queued", None),
        subs["paused@example.com"].id: ("skipped", "marketing_paused"),
        subs["silent@example.com"].id: ("skipped", "not_consented"),
        device_yes.id: ("queued", None),
        device_no.id: ("skipped", "withdrawn"),
    }
    assert message.fanned_out_at is not None
    # Running it again adds nothing: the cursor moved with the rows.
    assert push_messages.fan_out_batch(session, catalog, message.id, now) == 0


def test_customer_audience_counts_people_without_a_browser(session, catalog):
    reachable = create_customer(session, "r@example.com")
    record_consent(session, reachable, "offers", "web_push", "granted", PROOF, catalog=catalog)
    subscribe(session, customer=reachable)
    nobody = create_customer(session, "n@example.com")
    message = push_messages.create_message(
        session, catalog, message_data(audience={"customers": [reachable.public_id,
                                                               nobody.public_id]}),
        api_key_id=None)
    assert message.unreachable == 1
    push_messages.fan_out_batch(session, catalog, message.id, utcnow())
    assert push_messages.summary(session, message)["counts"]["queued"] == 1
    with pytest.raises(push_messages.MessageError) as exc:
        push_messages.create_message(
            session, catalog, message_data(audience={"customers": ["cus_nobody"]}),
            api_key_id=None)
    assert exc.value.field == "audience.customers[0]"


# --- delivery bookkeeping -----------------------------------------------------------------------


@pytest.fixture
def queued(session, catalog):
    """One customer delivery queued now, and a second subscription whose endpoint starts with
    the first one's (an expiry must match exactly)."""
    customer = create_customer(session, "d@example.com")
    record_consent(session, customer, "offers", "web_push", "granted", PROOF, catalog=catalog)
    sub = subscribe(session, customer=customer)
    raw, _ = make_fake_subscription(ORIGIN, path=sub.endpoint.removeprefix(ORIGIN) + "x")
    longer, _ = push.save_subscription(session, push.check_subscription(raw, allow_http=False),
                                       customer=None, device_hash=None, user_agent=None,
                                       locale=None)
    message = push_messages.create_message(session, catalog, message_data(
        audience={"customers": [customer.public_id]}), api_key_id=None)
    push_messages.fan_out_batch(session, catalog, message.id, utcnow())
    delivery = session.scalars(select(PushDelivery).where(
        PushDelivery.message_id == message.id)).one()
    return delivery, sub, longer, message


POLICY = push_messages.RetryPolicy(base_seconds=10, max_attempts=3)


def test_claims_are_leased(session, queued):
    delivery, *_ = queued
    now = utcnow()
    assert push_messages.claim_due(session, now, POLICY) == [delivery.id]
    assert push_messages.claim_due(session, now, POLICY) == []
    later = now + timedelta(seconds=POLICY.lease_seconds + 1)
    assert push_messages.claim_due(session, later, POLICY) == [delivery.id]


def test_gone_expires_exactly_that_endpoint(session, queued):
    delivery, sub, longer, _ = queued
    outcome = PushOutcome("gone", sub.endpoint, 410)
    assert push_messages.record_outcome(session, delivery.id, outcome, utcnow(), POLICY) \
        == "expired"
    session.refresh(sub)
    session.refresh(longer)
    assert sub.expired_at is not None and sub.expired_reason == "gone"
    assert longer.expired_at is None


def test_a_refused_destination_expires_exactly_that_endpoint(session, queued):
    delivery, sub, longer, _ = queued
    outcome = PushOutcome("refused_destination", sub.endpoint,
                          detail="private_address: The URL points to a private network.")
    assert push_messages.record_outcome(session, delivery.id, outcome, utcnow(), POLICY) \
        == "expired"
    assert delivery.reason == "refused_destination"
    session.refresh(sub)
    session.refresh(longer)
    assert sub.expired_reason == "refused_destination" and longer.expired_at is None


def test_only_the_callers_own_subscription_is_renewed(session):
    owner = create_customer(session, "owner@example.com")
    other = create_customer(session, "other@example.com")
    mine = subscribe(session, customer=owner)
    device = subscribe(session, device="dev-9")
    fresh = push.check_subscription(make_fake_subscription(ORIGIN)[0], allow_http=False)
    before = (mine.endpoint, device.endpoint)
    for sub in (mine, device):
        for customer, device_hash in ((other, None), (None, push.sha256("dev-1")),
                                      (None, None)):
            assert not push.renew(session, sub.endpoint, fresh, customer=customer,
                                  device_hash=device_hash)
    assert (mine.endpoint, device.endpoint) == before
    assert push.renew(session, device.endpoint, fresh, customer=None,
                      device_hash=push.sha256("dev-9"))
    assert device.endpoint == fresh.endpoint


def test_rate_limit_waits_retry_after_and_errors_back_off(session, queued):
    delivery, *_ = queued
    now = utcnow()
    limited = PushOutcome("rate_limited", "x", 429, retry_after=120)
    assert push_messages.record_outcome(session, delivery.id, limited, now, POLICY) == "queued"
    assert delivery.next_attempt_at == now + timedelta(seconds=120)
    retry = PushOutcome("retry", "x", 503)
    push_messages.record_outcome(session, delivery.id, retry, now, POLICY)
    # Second attempt: between half and all of base * 2.
    assert now + timedelta(seconds=10) <= delivery.next_attempt_at <= now + timedelta(seconds=20)
    assert push_messages.record_outcome(session, delivery.id, retry, now, POLICY) == "failed"
    assert delivery.reason == "gave_up_retry" and delivery.attempts == 3


def test_too_large_and_config_errors_fail_without_retry(session, queued):
    delivery, *_ = queued
    for status in ("too_large", "config_error"):
        delivery.status = "queued"
        outcome = PushOutcome(status, "x", 413 if status == "too_large" else 403)
        assert push_messages.record_outcome(session, delivery.id, outcome, utcnow(), POLICY) \
            == "failed"
        assert delivery.reason == status


def test_a_sent_message_counts_once_per_person_for_the_weekly_cap(session, queued):
    delivery, sub, _, message = queued
    outcome = PushOutcome("sent", sub.endpoint, 201)
    push_messages.record_outcome(session, delivery.id, outcome, utcnow(), POLICY)
    push_messages.record_outcome(session, delivery.id, outcome, utcnow(), POLICY)
    dispatches = session.scalars(select(Dispatch).where(
        Dispatch.message_id == message.public_id)).all()
    assert [(d.channel, d.topic_key) for d in dispatches] == [("web_push", "offers")]


def test_subscription_expired_while_queued_is_not_sent(session, queued):
    delivery, sub, *_ = queued
    push.leave(session, sub.endpoint)
    session.expire_all()
    assert push_messages.prepare(session, [delivery.id], utcnow()) == []
    assert (delivery.status, delivery.reason) == ("expired", "left")


def test_erasure_blanks_subscriptions(session, catalog):
    customer = create_customer(session, "erase@example.com")
    sub = subscribe(session, customer=customer)
    push.erase_subscriptions(session, customer)
    session.flush()
    row = session.get(PushSubscription, sub.id)
    assert row.endpoint.startswith("erased:") and row.expired_at is not None
    assert row.auth == "" and row.user_agent is None
