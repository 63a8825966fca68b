"""Every decision reads a person's facts from ``customers.decision_facts``, a copy of their
consent states (with the events that set them), active suppressions and contact rules kept by
database triggers. These tests prove the copy says what the tables say, whoever writes them:
each service that changes the three tables, SQL that bypasses the application, two
transactions writing one person's facts at once (PostgreSQL), and the migration that adds the
copy to a database that already holds people."""

from __future__ import annotations

import threading
import time as clock
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Connection, Engine, bindparam, inspect, select, text
from sqlalchemy.orm import Session

import portal.models  # noqa: F401
from portal.cli import alembic_config
from portal.core.db import Base, UTCDateTime, make_engine
from portal.models.catalog import CHANNELS
from portal.models.consent import ANY, ConsentEvent, ConsentState, ContactRule, Suppression
from portal.models.customer import Customer
from portal.models.decision_facts import drift_statement
from portal.services import identity, privacy, suppressions
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from portal.services.decisions import (
    Evidence,
    FactIndex,
    Pressure,
    copies_of,
    decide_many,
    index_facts,
)
from portal.services.preferences import PressureRule, set_contact_pressure
from tests.support.databases import KINDS, fresh_database

AT = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
PROOF = Proof("portal", "test")
TOPICS = {"newsletter", "offers", "loyalty", "surveys", "events", "orders", "account", ANY}
ALL_CHANNELS = {*CHANNELS, ANY}


def drifted(session: Session) -> list[int]:
    """Ids of people whose copy differs from a fresh computation."""
    dialect = session.get_bind().dialect.name
    return list(session.scalars(text(drift_statement(dialect))))


def stored(session: Session, cid: int) -> str | None:
    return session.scalar(select(Customer.decision_facts).where(Customer.id == cid))


def from_tables(session: Session, cid: int) -> FactIndex:
    """What the copy must say, read from the tables themselves (columns, not ORM objects: raw
    SQL may have changed rows the Session holds)."""
    states = {
        (cid, topic, channel): Evidence(event_id, occurred_at, source, wording, state)
        for topic, channel, state, event_id, occurred_at, source, wording in session.execute(
            select(ConsentState.topic_key, ConsentState.channel, ConsentState.state,
                   ConsentEvent.id, ConsentEvent.occurred_at, ConsentEvent.source,
                   ConsentEvent.wording_version)
            .join(ConsentEvent, ConsentEvent.id == ConsentState.event_id)
            .where(ConsentState.customer_id == cid))}
    active = [(channel, reason) for channel, reason in session.execute(
        select(Suppression.channel, Suppression.reason)
        .where(Suppression.customer_id == cid, Suppression.lifted_at.is_(None)))]
    # Tests keep one active suppression per channel: with two, the copy keeps either reason.
    assert len({channel for channel, _ in active}) == len(active)
    rules = {(cid, channel): Pressure(cap, start, end)
             for channel, cap, start, end in session.execute(
                 select(ContactRule.channel, ContactRule.max_per_week, ContactRule.quiet_start,
                        ContactRule.quiet_end).where(ContactRule.customer_id == cid))}
    return FactIndex(states, {(cid, channel): reason for channel, reason in active}, rules)


def copy_says(session: Session, cid: int) -> FactIndex:
    return index_facts(copies_of(session, {cid}), TOPICS, ALL_CHANNELS)


def assert_copies_true(session: Session, *people: Customer) -> FactIndex:
    """No copy drifts, and each person's copy (as decisions read it) equals their tables.
    Returns the last person's facts, for the step's own assertions."""
    session.flush()
    assert drifted(session) == []
    facts = FactIndex({}, {}, {})
    for person in people:
        facts = copy_says(session, person.id)
        assert facts == from_tables(session, person.id)
    return facts


def test_every_service_that_writes_facts_keeps_the_copy_true(session):
    catalog = get_catalog(session)
    ann = create_customer(session, "ann@example.com", phone="+33611111111")
    bob = create_customer(session, "bob@example.com")
    assert assert_copies_true(session, ann, bob) == FactIndex({}, {}, {})

    def choose(person: Customer, topic: str, channel: str, state: str) -> dict[Any, Evidence]:
        record_consent(session, person, topic, channel, state, PROOF, catalog=catalog)
        return assert_copies_true(session, person).states

    assert choose(ann, "newsletter", "email", "granted")[
        (ann.id, "newsletter", "email")].state == "granted"
    assert choose(ann, "newsletter", "email", "withdrawn")[
        (ann.id, "newsletter", "email")].state == "withdrawn"
    assert choose(ann, ANY, "sms", "withdrawn")[(ann.id, ANY, "sms")].state == "withdrawn"
    assert choose(ann, ANY, ANY, "withdrawn")[(ann.id, ANY, ANY)].state == "withdrawn"
    assert choose(ann, ANY, ANY, "granted")[(ann.id, ANY, ANY)].state == "granted"
    offers = choose(ann, "offers", ANY, "granted")  # one event, a state per offered channel
    assert {ch for (_, t, ch) in offers if t == "offers"} == set(catalog.get("offers").channels)

    bounce = suppressions.add(session, ann, "email", "hard_bounce", "ann@example.com")
    assert assert_copies_true(session, ann).suppressed == {(ann.id, "email"): "hard_bounce"}
    suppressions.lift(session, bounce, ann)
    assert assert_copies_true(session, ann).suppressed == {}

    set_contact_pressure(session, ann, "Europe/Paris", {
        "email": PressureRule(3, time(22), time(7)), "sms": PressureRule(1, None, None)})
    assert assert_copies_true(session, ann).rules == {
        (ann.id, "email"): Pressure(3, time(22), time(7)), (ann.id, "sms"): Pressure(1)}
    set_contact_pressure(session, ann, "Europe/Paris", {
        "email": PressureRule(None, time(21, 30), time(8)),
        "sms": PressureRule(None, None, None)})
    assert assert_copies_true(session, ann).rules == {
        (ann.id, "email"): Pressure(None, time(21, 30), time(8)), (ann.id, "sms"): Pressure()}

    choose(bob, "events", "email", "withdrawn")
    suppressions.add(session, bob, "sms", "sms_stop", None)
    set_contact_pressure(session, bob, "UTC", {"app_push": PressureRule(2, None, None),
                                               "email": PressureRule(9, None, None)})
    before = assert_copies_true(session, bob)

    # The more restrictive choice, the suppression and the missing rule move to the survivor;
    # the merged record's own facts stay as they were.
    identity.merge(session, catalog, ann, bob, "test")
    survivor = assert_copies_true(session, bob, ann)
    assert copy_says(session, bob.id) == before
    moved = survivor.states[(ann.id, "events", "email")]
    assert (moved.state, moved.source) == ("withdrawn", "merge")
    assert survivor.suppressed == {(ann.id, "sms"): "sms_stop"}
    assert survivor.rules[(ann.id, "app_push")] == Pressure(2)
    assert survivor.rules[(ann.id, "email")] == Pressure(None, time(21, 30), time(8))

    privacy.erase_customer(session, ann, Proof("portal", "ann"), catalog, [])
    erased = assert_copies_true(session, ann)
    assert erased.rules == {}
    assert erased.states[(ann.id, ANY, ANY)].state == "withdrawn"


def test_sql_that_bypasses_the_application_updates_the_copy_too(session):
    catalog = get_catalog(session)
    cay = create_customer(session, "cay@example.com", timezone="UTC")
    dan = create_customer(session, "dan@example.com")
    record_consent(session, cay, "newsletter", "email", "granted", PROOF, catalog=catalog,
                   at=AT - timedelta(days=1))
    set_contact_pressure(session, cay, "UTC", {"email": PressureRule(None, time(11), time(13))})
    suppressions.add(session, cay, "sms", "complaint", None)
    assert_copies_true(session, cay, dan)

    def reason() -> str:
        [person] = identity.resolve_people(session, [{"id": cay.public_id}])
        [decision] = decide_many(session, catalog, [(person, "newsletter", "email")], AT)
        return decision.reason

    assert reason() == "quiet_hours"  # 12:00 UTC is inside 11:00-13:00
    session.execute(text("DELETE FROM contact_rules WHERE customer_id = :c"), {"c": cay.id})
    assert assert_copies_true(session, cay).rules == {}
    assert reason() == "consented"

    session.execute(text("UPDATE consent_states SET state = 'withdrawn' WHERE customer_id = :c"),
                    {"c": cay.id})
    assert assert_copies_true(session, cay).states[
        (cay.id, "newsletter", "email")].state == "withdrawn"
    assert reason() == "withdrawn"

    # An UPDATE that moves a row to someone else refreshes both people.
    session.execute(text("UPDATE suppressions SET customer_id = :d WHERE customer_id = :c"),
                    {"c": cay.id, "d": dan.id})
    assert assert_copies_true(session, cay).suppressed == {}
    assert assert_copies_true(session, dan).suppressed == {(dan.id, "sms"): "complaint"}


def test_a_person_without_facts_has_no_copy_and_loses_it_with_their_last_fact(session):
    catalog = get_catalog(session)
    eve = create_customer(session, "eve@example.com")
    session.flush()
    assert stored(session, eve.id) is None
    assert copies_of(session, {eve.id}) == []

    rule = ContactRule(customer_id=eve.id, channel="email", max_per_week=2)
    session.add(rule)
    session.flush()
    assert stored(session, eve.id) is not None
    session.delete(rule)
    session.flush()
    assert stored(session, eve.id) is None

    bounce = suppressions.add(session, eve, "email", "hard_bounce", "eve@example.com")
    session.flush()
    assert stored(session, eve.id) is not None
    suppressions.lift(session, bounce, eve)
    session.flush()
    assert stored(session, eve.id) is None

    record_consent(session, eve, "offers", "email", "granted", PROOF, catalog=catalog)
    session.flush()
    assert stored(session, eve.id) is not None
    session.execute(text("DELETE FROM consent_states WHERE customer_id = :c"), {"c": eve.id})
    assert stored(session, eve.id) is None
    assert drifted(session) == []



def test_the_cli_finds_copies_that_differ_and_rebuilds_them(app, connection):
    """Operators who ran SQL with the triggers off (a bulk load, a partial restore) can find
    the copies it left stale, and rebuild them."""
    from click.testing import CliRunner

    from portal.cli import facts_cli

    with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
        zoe = create_customer(session, "zoe@example.com")
        session.flush()
        zoe_id = zoe.id
        session.add(ContactRule(customer_id=zoe_id, channel="email", max_per_week=1))
        session.commit()
    runner = CliRunner()
    with app.app_context():
        assert runner.invoke(facts_cli, ["verify"]).exit_code == 0
        connection.execute(text("UPDATE customers SET decision_facts = NULL WHERE id = :c"),
                           {"c": zoe_id})
        stale = runner.invoke(facts_cli, ["verify"])
        assert stale.exit_code == 1 and "1 customers" in stale.output
        assert f"ids {zoe_id}" in stale.output
        rebuilt = runner.invoke(facts_cli, ["rebuild"])
        assert rebuilt.exit_code == 0, rebuilt.output
        assert runner.invoke(facts_cli, ["verify"]).exit_code == 0
    assert connection.scalar(text("SELECT decision_facts FROM customers WHERE id = :c"),
                             {"c": zoe_id}) is not None

# Plain SQL, so that the same statements run before and after the migration.
def add_customer(conn: Connection, public_id: str) -> int:
    conn.execute(text("INSERT INTO customers (public_id, auth_epoch, created_at, updated_at) "
                      "VALUES (:p, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"p": public_id})
    return int(conn.execute(text("SELECT id FROM customers WHERE public_id = :p"),
                            {"p": public_id}).scalar_one())


def add_choice(conn: Connection, cid: int, topic: str, channel: str, state: str,
               at: datetime = AT) -> int:
    """An event and the state it sets, as an import writing SQL would."""
    when = {"c": cid, "t": topic, "ch": channel, "s": state}
    moment = bindparam("at", at, type_=UTCDateTime())
    event_id = int(conn.execute(text(
        "INSERT INTO consent_events (customer_id, topic_key, channel, state, source, actor, "
        "occurred_at) VALUES (:c, :t, :ch, :s, 'import', 'sql', :at) RETURNING id"
    ).bindparams(moment), when).scalar_one())
    conn.execute(text(
        "INSERT INTO consent_states (customer_id, topic_key, channel, state, event_id, "
        "updated_at) VALUES (:c, :t, :ch, :s, :e, :at)").bindparams(moment),
        {**when, "e": event_id})
    return event_id


def test_two_transactions_writing_one_persons_facts_keep_both(engine, tmp_path):
    """The second writer waits for the first (the trigger locks the person's row), then
    computes the copy from what the first committed, instead of overwriting it."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises writers: two transactions cannot write at once")
    with fresh_database("postgresql", tmp_path) as url:
        eng = make_engine(url)
        try:
            Base.metadata.create_all(eng)
            with eng.begin() as conn:
                cid = add_customer(conn, "cus_both")
            first, second = eng.connect(), eng.connect()
            errors: list[BaseException] = []
            try:
                add_choice(first, cid, "newsletter", "email", "granted")  # not committed
                pid = second.execute(text("SELECT pg_backend_pid()")).scalar_one()

                def write_second() -> None:
                    try:
                        add_choice(second, cid, "offers", "email", "granted")
                        second.commit()
                    except BaseException as exc:  # pragma: no cover - reported below
                        errors.append(exc)

                writer = threading.Thread(target=write_second)
                writer.start()
                assert waits_on_a_lock(eng, pid), "the second writer did not wait"
                first.commit()
                writer.join(30)
                assert not writer.is_alive()
                assert errors == []
            finally:
                first.close()
                second.close()
            with Session(eng) as s:
                facts = index_facts(copies_of(s, {cid}), TOPICS, ALL_CHANNELS)
                assert set(facts.states) == {(cid, "newsletter", "email"),
                                             (cid, "offers", "email")}
                assert drifted(s) == []
        finally:
            eng.dispose()


def waits_on_a_lock(eng: Engine, pid: int, timeout: float = 10.0) -> bool:
    """Poll (a new transaction each time: activity is a per-transaction snapshot)."""
    deadline = clock.monotonic() + timeout
    while clock.monotonic() < deadline:
        with eng.connect() as conn:
            if conn.execute(text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"),
                            {"p": pid}).scalar() == "Lock":
                return True
        clock.sleep(0.01)
    return False


def migrate(eng: Engine, url: str, step: str, revision: str) -> None:
    with eng.begin() as connection:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = connection  # type: ignore[attr-defined]
        getattr(command, step)(cfg, revision)


@pytest.mark.parametrize("kind", KINDS)
def test_migration_fills_the_copies_of_people_already_there_and_downgrades(kind, tmp_path):
    with fresh_database(kind, tmp_path) as url:
        eng = make_engine(url)
        try:
            migrate(eng, url, "upgrade", "0002")
            with eng.begin() as conn:
                ann, bob = add_customer(conn, "cus_ann"), add_customer(conn, "cus_bob")
                event = add_choice(conn, ann, "newsletter", "email", "granted")
                conn.execute(text(
                    "INSERT INTO suppressions (customer_id, channel, reason, source, created_at,"
                    " lifted_at) VALUES (:c, 'sms', 'sms_stop', 'api', CURRENT_TIMESTAMP, NULL),"
                    " (:c, 'email', 'complaint', 'api', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                    {"c": ann})
                conn.execute(text(
                    "INSERT INTO contact_rules (customer_id, channel, max_per_week, quiet_start,"
                    " quiet_end) VALUES (:c, 'email', 3, '22:00:00', '07:00:00')"), {"c": ann})

            migrate(eng, url, "upgrade", "head")
            with Session(eng) as s:
                assert index_facts(copies_of(s, {ann, bob}), TOPICS, ALL_CHANNELS) == FactIndex(
                    {(ann, "newsletter", "email"): Evidence(event, AT, "import", None,
                                                            "granted")},
                    {(ann, "sms"): "sms_stop"},
                    {(ann, "email"): Pressure(3, time(22), time(7))})
                assert stored(s, bob) is None
                assert drifted(s) == []

            migrate(eng, url, "downgrade", "0002")
            assert "decision_facts" not in {
                column["name"] for column in inspect(eng).get_columns("customers")}
            with eng.begin() as conn:  # no trigger is left behind to write a missing column
                add_choice(conn, bob, "offers", "sms", "granted")
                conn.execute(text("UPDATE consent_states SET state = 'withdrawn'"))
                conn.execute(text(
                    "INSERT INTO suppressions (customer_id, channel, reason, source, created_at)"
                    " VALUES (:c, 'email', 'manual', 'api', CURRENT_TIMESTAMP)"), {"c": bob})
                conn.execute(text("DELETE FROM contact_rules"))

            migrate(eng, url, "upgrade", "head")  # and up again: copies as the tables say
            with Session(eng) as s:
                facts = index_facts(copies_of(s, {ann, bob}), TOPICS, ALL_CHANNELS)
                assert {key: e.state for key, e in facts.states.items()} == {
                    (ann, "newsletter", "email"): "withdrawn", (bob, "offers", "sms"): "withdrawn"}
                assert facts.suppressed == {(ann, "sms"): "sms_stop", (bob, "email"): "manual"}
                assert facts.rules == {}
                assert drifted(s) == []
        finally:
            eng.dispose()
