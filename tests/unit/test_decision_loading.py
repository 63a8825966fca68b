"""Loading facts in bulk (one array parameter: ``= ANY`` on PostgreSQL, ``json_each`` on
SQLite) gives every question the same answer as asking it alone, and the audience export's
SQL pre-filter never drops a person decide() allows nor lets in one it denies."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import partial

import orjson
import pytest

from portal.models.consent import ContactRule, Dispatch, Suppression
from portal.services import audiences, identity
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.decisions import decide_many, decide_one

AT = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)  # 14:00 in Paris
PAIRS = [("newsletter", "email"), ("offers", "email"), ("offers", "sms"), ("orders", "email"),
         ("orders", "sms"), ("account", "email"), ("account", "sms"), ("events", "email"),
         ("nosuch", "email"), ("newsletter", "sms")]


@pytest.fixture
def people(session):
    """One person per situation the rules tell apart."""
    catalog = get_catalog(session)
    proof = Proof("portal", "test")
    made = {}

    def person(name, **fields):
        made[name] = create_customer(session, f"{name}@example.com", **fields)
        return made[name]

    def choose(name, topic, channel, state):
        record_consent(session, made[name], topic, channel, state, proof, catalog=catalog,
                       at=AT - timedelta(days=2))

    person("plain")
    person("granted", phone="+33611111111")
    choose("granted", "newsletter", "email", "granted")
    choose("granted", "offers", "sms", "granted")
    person("everywhere", phone="+33622222222")
    choose("everywhere", "offers", "*", "granted")  # (topic, *) expands to every channel
    choose("everywhere", "orders", "sms", "granted")
    person("withdrawn")
    choose("withdrawn", "newsletter", "email", "granted")
    choose("withdrawn", "newsletter", "email", "withdrawn")
    person("pending")
    choose("pending", "newsletter", "email", "pending")
    person("paused")
    choose("paused", "newsletter", "email", "granted")
    choose("paused", "*", "*", "withdrawn")
    person("email_off")
    choose("email_off", "newsletter", "email", "granted")
    choose("email_off", "*", "email", "withdrawn")
    person("bounced")
    choose("bounced", "newsletter", "email", "granted")
    session.add(Suppression(customer_id=made["bounced"].id, channel="email",
                            reason="hard_bounce"))
    person("lifted")
    choose("lifted", "newsletter", "email", "granted")
    session.add(Suppression(customer_id=made["lifted"].id, channel="email", reason="complaint",
                            lifted_at=AT - timedelta(days=1)))
    person("capped", timezone="Europe/Paris")
    choose("capped", "newsletter", "email", "granted")
    session.add(ContactRule(customer_id=made["capped"].id, channel="email", max_per_week=1))
    session.add(Dispatch(customer_id=made["capped"].id, topic_key="newsletter",
                         channel="email", sent_at=AT - timedelta(days=1), sender="test"))
    person("quiet", timezone="Europe/Paris")
    choose("quiet", "newsletter", "email", "granted")
    session.add(ContactRule(customer_id=made["quiet"].id, channel="email",
                            quiet_start=time(13, 0), quiet_end=time(15, 0)))
    person("no_phone")
    choose("no_phone", "offers", "sms", "granted")
    session.flush()
    return made


def answers(decisions):
    return [(d.decision, d.reason, d.evidence.event_id if d.evidence else None,
             d.next_allowed_at, d.contact) for d in decisions]


def test_bulk_load_answers_each_question_as_if_asked_alone(session, people):
    catalog = get_catalog(session)
    rows = identity.resolve_people(session, [{"email": f"{n}@example.com"} for n in people]
                                   + [{"email": "nobody@example.com"}])
    questions = [(row, t, ch) for row in rows for t, ch in PAIRS]
    together = decide_many(session, catalog, questions, AT)
    alone = [decide_many(session, catalog, [q], AT)[0] for q in questions]
    assert answers(together) == answers(alone)
    by = {(row.email if row else None, t, ch): d
          for (row, t, ch), d in zip(questions, together, strict=True)}
    expected = {
        ("granted@example.com", "newsletter", "email"): "consented",
        ("everywhere@example.com", "offers", "sms"): "consented",
        ("everywhere@example.com", "orders", "sms"): "consented",
        ("plain@example.com", "orders", "email"): "consented",
        ("plain@example.com", "orders", "sms"): "not_consented",
        ("plain@example.com", "account", "email"): "required_service",
        ("withdrawn@example.com", "newsletter", "email"): "withdrawn",
        ("pending@example.com", "newsletter", "email"): "pending_confirmation",
        ("paused@example.com", "newsletter", "email"): "marketing_paused",
        ("paused@example.com", "orders", "email"): "consented",
        ("email_off@example.com", "newsletter", "email"): "channel_off",
        ("bounced@example.com", "newsletter", "email"): "suppressed",
        ("bounced@example.com", "account", "email"): "suppressed",
        ("lifted@example.com", "newsletter", "email"): "consented",
        ("capped@example.com", "newsletter", "email"): "frequency_cap",
        ("quiet@example.com", "newsletter", "email"): "quiet_hours",
        ("no_phone@example.com", "offers", "sms"): "no_contact_point",
        ("plain@example.com", "nosuch", "email"): "unknown_topic",
        ("plain@example.com", "newsletter", "sms"): "channel_not_offered",
        (None, "newsletter", "email"): "unknown_customer",
    }
    assert {key: by[key].reason for key in expected} == expected


@pytest.mark.parametrize(("topic", "channel"), [
    ("newsletter", "email"),  # marketing: only a granted choice can allow
    ("offers", "sms"),        # granted through (offers, *)
    ("orders", "email"),      # service topic on by default: everyone reachable
    ("orders", "sms"),        # service topic off by default: granted choices only
    ("account", "sms"),       # required: everyone reachable, not suppressed
])
def test_audience_prefilter_keeps_exactly_whom_decide_allows(session, people, topic, channel):
    catalog = get_catalog(session)
    info = catalog.get(topic)
    assert info is not None
    everyone = identity.resolve_people(session, [{"email": f"{n}@example.com"} for n in people])
    allowed = {row.public_id for row, d in zip(everyone, decide_many(
        session, catalog, [(row, topic, channel) for row in everyone], AT), strict=True)
        if d.allowed}
    exported = {person.public_id for person, member in audiences.scan(
        session, catalog, info, channel, AT, chunk=4) if member is not None}
    assert exported == allowed
    assert allowed  # each case lets someone through, so the comparison means something


@pytest.mark.parametrize("block_bytes", [None, 150])
@pytest.mark.parametrize("odd_addresses", [False, True])
@pytest.mark.parametrize(("topic", "channel"), [
    ("newsletter", "email"),  # marketing: granted choices only
    ("offers", "sms"),        # granted through (offers, *)
    ("orders", "email"),      # service, on by default
    ("orders", "app_push"),   # contact point: the public id
    ("account", "sms"),       # required
])
def test_ndjson_export_writes_exactly_the_lines_of_the_row_by_row_export(
        session, people, topic, channel, odd_addresses, block_bytes, monkeypatch):
    """On PostgreSQL the export writes most lines in SQL, from decide()'s verdict per shape of
    facts; they must be, byte for byte, the lines the row-by-row path writes with
    :meth:`Member.as_json`: plain rows (one pattern over a whole block) and, with
    ``odd_addresses``, addresses JSON must escape and a missing locale (line by line).
    ``block_bytes`` 150 cuts COPY's output into blocks of two or three rows, so people under
    contact pressure come first, last, alone or between others in a block."""
    if block_bytes is not None:
        if session.get_bind().dialect.name != "postgresql":
            pytest.skip("COPY blocks: PostgreSQL only")
        monkeypatch.setattr(audiences, "copy_out", partial(audiences.copy_out,
                                                           block_bytes=block_bytes))
    catalog = get_catalog(session)
    proof = Proof("portal", "test")
    for customer in people.values():
        customer.locale = "en"
    odd = {"quote": 'say"hi"@example.com', "backslash": "back\\slash@example.com",
           "control": "bell\x07@example.com", "accent": "zoé.ñandú@exämple.com",
           "tab": "tab\there@example.com"} if odd_addresses else {}
    for name, address in odd.items():
        customer = create_customer(session, f"{name}@example.com", phone="+3361234567"
                                   + str(len(name)))
        customer.email = address
        customer.locale = None if name in ("accent", "quote") else "fr"
        for t, ch in (("newsletter", "email"), ("offers", "sms"), ("orders", "app_push")):
            record_consent(session, customer, t, ch, "granted", proof, catalog=catalog,
                           at=AT - timedelta(days=1))
    session.flush()
    info = catalog.get(topic)
    assert info is not None
    written = b"".join(audiences.ndjson(session, catalog, info, channel, AT)).splitlines()
    by_row = [orjson.dumps(member.as_json()) for _, member in audiences.scan(
        session, catalog, info, channel, AT) if member is not None]
    assert sorted(written) == sorted(by_row)
    assert len(written) >= 2  # each case exports several people
    if (topic, channel) == ("newsletter", "email"):
        exported = {orjson.loads(line)["contact"]["email"] for line in written}
        assert set(odd.values()) <= exported
        assert "capped@example.com" not in exported  # under its weekly cap: deferred


def test_a_single_decision_in_one_statement_answers_as_the_bulk_path(session, people):
    """The single-decision path reads the person and their facts in one statement; for every
    situation, by every identifier held on the customer row, and for a merged record (which
    means its survivor), it answers what decide_many answers."""
    catalog = get_catalog(session)
    merged = create_customer(session, "merged@example.com", phone="+33699999999")
    identity.merge(session, catalog, people["paused"], merged, "test")
    session.flush()
    names = [*people, "merged"]
    rows = identity.resolve_people(session, [{"email": f"{n}@example.com"} for n in names])
    refs = [{"email": f"{n.upper()}@Example.com"} for n in names] + [
        {"id": row.public_id} for row in rows] + [{"phone": "+33 6 11 11 11 11"},
                                                   {"email": "nobody@example.com"},
                                                   {"id": "cus_nobody"}]
    for ref in refs:
        lookup = identity.column_lookup(ref)
        assert lookup is not None
        [person] = identity.resolve_people(session, [ref])
        for topic, channel in PAIRS:
            found, one, _ = decide_one(session, catalog, *lookup, topic, channel, AT)
            [many] = decide_many(session, catalog, [(person, topic, channel)], AT)
            assert answers([one]) == answers([many]), (ref, topic, channel)
            assert (found.id if found else None) == (person.id if person else None)
    [survivor] = identity.resolve_people(session, [{"email": "merged@example.com"}])
    assert survivor.id == people["paused"].id


def test_a_guarded_single_decision_looks_nobody_up_unless_the_guard_holds(session, people):
    """The API reads the caller's key in the decision's statement (``KEY_GUARD``): with a live
    key the answer is the unguarded one, with the key's row beside it; with an unknown or a
    revoked key nobody is looked up, so the statement's work does not depend on who is a
    customer."""
    from portal.services import api_keys

    catalog = get_catalog(session)
    made = api_keys.create_key(session, "guarded", ["decisions:read"])
    session.flush()
    lookup = ("email", "granted@example.com")
    plain, alone, none = decide_one(session, catalog, *lookup, "newsletter", "email", AT)
    assert none == [] and alone.reason == "consented"
    found, guarded, rows = decide_one(
        session, catalog, *lookup, "newsletter", "email", AT, guard=api_keys.KEY_GUARD,
        guard_params=api_keys.guard_params(made.secret))
    assert found == plain and answers([guarded]) == answers([alone])
    caller = api_keys.caller_of(rows)
    assert caller is not None and caller.id == made.key.id and caller.name == "guarded"
    assert caller.scopes == ["decisions:read"]
    for secret in ("carnet_unknown", made.secret):
        if secret == made.secret:
            api_keys.revoke_key(session, "guarded")
            session.flush()
        found, denied, rows = decide_one(
            session, catalog, *lookup, "newsletter", "email", AT, guard=api_keys.KEY_GUARD,
            guard_params=api_keys.guard_params(secret))
        assert (found, denied.reason, rows) == (None, "unknown_customer", [])


def test_a_batch_finds_people_with_their_facts_and_answers_as_single_decisions(session,
                                                                               people):
    """decide_batch() finds people and reads their facts in one statement per kind of
    identifier: by public id, email, phone or external id, for merged records (their
    survivor), unknown people and repeated questions, each answer is the single decision's."""
    from portal.models.customer import ExternalId

    catalog = get_catalog(session)
    merged = create_customer(session, "merged@example.com", phone="+33699999999")
    identity.merge(session, catalog, people["paused"], merged, "test")
    session.add(ExternalId(customer_id=people["granted"].id, namespace="crm", value="G"))
    session.add(ExternalId(customer_id=merged.id, namespace="crm", value="M"))
    session.flush()
    refs = [{"email": f"{n.upper()}@Example.com"} for n in [*people, "merged"]] + [
        {"id": c.public_id} for c in [*people.values(), merged]] + [
        {"phone": "+33 6 11 11 11 11"}, {"phone": "+33699999999"},
        {"external_id": {"namespace": "crm", "value": "G"}},
        {"external_id": {"namespace": "crm", "value": "M"}},
        {"external_id": {"namespace": "crm", "value": "nobody"}},
        {"email": "nobody@example.com"}, {"id": "cus_nobody"}]
    questions = [(ref, topic, channel) for ref in refs for topic, channel in PAIRS]
    together = identity.decide_batch(session, catalog, questions + questions[:7], AT)
    assert len(together) == len(questions) + 7
    for (ref, topic, channel), answer in zip(questions + questions[:7], together,
                                             strict=True):
        alone, _ = identity.decide_about(session, catalog, ref, topic, channel, AT)
        assert answers([answer]) == answers([alone]), (ref, topic, channel)
    reasons = {answer.reason for answer in together}
    assert {"consented", "withdrawn", "marketing_paused", "unknown_customer",
            "suppressed", "frequency_cap"} <= reasons
