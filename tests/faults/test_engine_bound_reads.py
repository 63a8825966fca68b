"""Reads as they run in production on PostgreSQL: bound to an Engine, not to a test's single
connection.

* The NDJSON export written by COPY, people under contact pressure judged as their rows
  pass: exactly the members the paginated export (row by row) lists, and nobody twice.
* A large batch decision is read in parts by a helper thread ahead of its decisions: every
  answer is the answer to the same question asked alone, and a part that cannot be read
  answers 503 without leaving anything waiting.
* Connections run without JIT and keep the options of their URL.
* A COPY read in part, or failing mid-way, leaves its connection usable.
* A single decision reads on a connection of its own, in autocommit: one statement, no
  BEGIN or COMMIT, the latest commits seen, and the connection back in the pool as it was."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import DataError, OperationalError

from portal.core import fast_rows
from portal.core.db import get_engine, make_engine, new_session, utcnow
from portal.loyalty.program import load_program
from portal.models.consent import ContactRule, Dispatch
from portal.models.customer import Customer
from portal.services import identity
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from tests.conftest import CATALOG
from tests.faults.helpers import dispose, live_database, make_live_app
from tests.support.api_client import make_key
from tests.support.databases import PG_URL
from tests.support.statements import counting

pytestmark = pytest.mark.skipif(not PG_URL, reason="needs PostgreSQL: set "
                                "CARNET_TEST_DATABASE_URL")


def seed(app, n: int) -> None:
    session = new_session(app)
    proof = Proof("portal", "test")
    with session.begin():
        catalog = get_catalog(session)
        for i in range(n):
            customer = create_customer(session, f"p{i}@example.com", locale="fr")
            record_consent(session, customer, "newsletter", "email",
                           "withdrawn" if i % 7 == 0 else "granted", proof, catalog=catalog,
                           at=utcnow() - timedelta(days=3))
            if i % 3 == 0:  # a weekly cap: judged row by row, beside the COPY
                session.add(ContactRule(customer_id=customer.id, channel="email",
                                        max_per_week=1))
                if i % 2 == 0:  # and already reached: deferred, not exported
                    session.add(Dispatch(customer_id=customer.id, topic_key="newsletter",
                                         channel="email", sent_at=utcnow() - timedelta(days=1),
                                         sender="test"))
    session.close()


@pytest.fixture
def live(tmp_path):
    """An app on its own PostgreSQL database and Engine, 120 people seeded, a client and the
    headers of a key with every scope."""
    with live_database("postgresql", tmp_path) as url:
        app = make_live_app(url, tmp_path)
        try:
            seed(app, 120)
            headers = {"Authorization": f"Bearer {make_key(app)}"}
            yield app.test_client(), headers
        finally:
            dispose(app)


def test_ndjson_export_on_an_engine_lists_each_member_once(live):
    client, headers = live
    response = client.get("/api/v1/audiences/newsletter/email",
                          headers={**headers, "Accept": "application/x-ndjson"})
    assert response.status_code == 200
    streamed = [orjson.loads(line) for line in response.data.splitlines()]
    paged, cursor = [], None
    while True:
        page = client.get("/api/v1/audiences/newsletter/email",
                          query_string={"limit": 50, **({"cursor": cursor} if cursor else {})},
                          headers=headers).get_json()
        paged += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    emails = [member["contact"]["email"] for member in streamed]
    assert len(emails) == len(set(emails))  # nobody twice
    assert sorted(emails) == sorted(m["contact"]["email"] for m in paged)
    capped_free = {f"p{i}@example.com" for i in range(120) if i % 7 and i % 3 == 0
                   and i % 2}
    reached = {f"p{i}@example.com" for i in range(120) if i % 7 and i % 6 == 0}
    assert capped_free <= set(emails)  # under a cap, not reached: exported
    assert not reached & set(emails)   # deferred people stay out
    assert len(emails) == len([i for i in range(120) if i % 7]) - len(reached)


def batch_questions(n: int) -> list[dict[str, Any]]:
    return [{"customer": {"email": f"p{i % 130}@example.com"},  # 10 unknown
             "topic": ("newsletter", "offers", "account")[i % 3],
             "channel": "email"} for i in range(n)]


def test_a_large_batch_read_ahead_in_parts_answers_as_single_decisions(live, monkeypatch):
    # 120 people stand for 10,000: parts of 400 questions, not 1,250
    monkeypatch.setattr(identity, "PART", 400)
    client, headers = live
    questions = batch_questions(2600)
    with counting(get_engine(client.application)) as tally:
        r = client.post("/api/v1/decisions/batch", json={"items": questions},
                        headers=headers)
    assert r.status_code == 200, r.get_json()
    # eight parts (80 questions, then 400 at a time), each looked up in one statement
    assert len([sql for sql in tally.statements if "json_array_elements_text" in sql]) == 8
    together = r.get_json()["results"]
    alone = {}
    for q in questions[:390]:  # every (customer, topic) pair once
        answer = client.post("/api/v1/decisions", json=q, headers=headers).get_json()
        alone[(q["customer"]["email"], q["topic"])] = answer
    assert len(together) == len(questions)
    for q, answer in zip(questions, together, strict=True):
        assert answer == alone[(q["customer"]["email"], q["topic"])], q
    reasons = {answer["reason"] for answer in together}
    assert {"consented", "withdrawn", "frequency_cap", "required_service",
            "unknown_customer"} <= reasons


def test_a_part_that_cannot_be_read_answers_503_and_the_next_batch_is_served(live,
                                                                           monkeypatch):
    """The helper thread reading parts ahead loses its connection on the third part: the
    request answers 503 like any database failure (not a hang, not a partial answer), and
    the next batch is answered in full."""
    monkeypatch.setattr(identity, "PART", 400)
    client, headers = live
    engine = get_engine(client.application)
    readers: list[str] = []

    def third_part_fails(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if "json_array_elements_text" in sql:
            readers.append(threading.current_thread().name)
            if len(readers) == 3:
                raise OperationalError(sql, None, Exception("server closed the connection"))

    event.listen(engine, "before_cursor_execute", third_part_fails)
    try:
        r = client.post("/api/v1/decisions/batch", json={"items": batch_questions(2600)},
                        headers=headers)
    finally:
        event.remove(engine, "before_cursor_execute", third_part_fails)
    assert r.status_code == 503, r.get_data(as_text=True)[:300]
    assert r.headers["Content-Type"] == "application/problem+json"
    assert readers[2].startswith("carnet-split")  # read ahead, raised in the request
    r = client.post("/api/v1/decisions/batch", json={"items": batch_questions(2600)},
                    headers=headers)
    assert r.status_code == 200 and len(r.get_json()["results"]) == 2600


def test_connections_run_without_jit_and_keep_the_options_of_their_url(tmp_path):
    with live_database("postgresql", tmp_path) as url:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW jit").scalar_one() == "off"
                # the test's own schema, given as options= in the URL, is still searched
                assert conn.exec_driver_sql("SELECT count(*) FROM topics").scalar_one() > 0
        finally:
            engine.dispose()


def test_a_copy_read_in_part_or_failing_leaves_the_connection_usable(live):
    """The export reads COPY from libpq itself: a client that goes away mid-stream, or a row
    that fails mid-COPY, must leave the connection usable (no "another command is already in
    progress"), back in the pool, not invalidated."""
    client, headers = live
    app = client.application
    session = new_session(app)
    try:
        ids = select(Customer.public_id).order_by(Customer.id)
        with session.begin():
            blocks = fast_rows.copy_out(session, ids, None, block_bytes=1)
            first = next(blocks)
            assert first.count(b"\n") == 1 and first.startswith(b"cus_")
            blocks.close()  # the reader stops after one row of 120
        with session.begin():
            assert session.scalar(select(func.count()).select_from(Customer)) == 120
            every = b"".join(fast_rows.copy_out(session, ids, None, block_bytes=100))
            assert every.count(b"\n") == 120
        # a division by zero on the 60th row, after 59 rows were sent
        with session.begin():
            sixtieth = session.scalars(select(Customer.id).order_by(Customer.id))
            sixtieth = list(sixtieth)[59]
        failing = select(Customer.public_id, func.div(1, Customer.id - sixtieth)
                         ).order_by(Customer.id)
        with pytest.raises(DataError, match="division by zero"), session.begin():
            for _ in fast_rows.copy_out(session, failing, None, block_bytes=1):
                pass
        with session.begin():
            assert session.scalar(select(func.count()).select_from(Customer)) == 120
    finally:
        session.close()
    # and the app still answers through the pool
    r = client.get("/api/v1/audiences/newsletter/email",
                   headers={**headers, "Accept": "application/x-ndjson"})
    assert r.status_code == 200 and r.data.count(b"\n") > 50


def test_a_single_decision_is_one_statement_that_sees_the_latest_commit(live):
    client, headers = live
    app = client.application
    engine = get_engine(app)
    question = {"customer": {"email": "p1@example.com"}, "topic": "newsletter",
                "channel": "email"}
    client.post("/api/v1/decisions", json=question, headers=headers)  # catalog cached
    with counting(engine) as tally:
        first = client.post("/api/v1/decisions", json=question, headers=headers)
    assert first.status_code == 200 and first.get_json()["reason"] == "consented"
    assert len(tally.statements) == 1 and tally.transaction_control == 0, tally

    session = new_session(app)
    with session.begin():
        customer = session.scalars(select(Customer).where(
            Customer.email == "p1@example.com")).one()
        record_consent(session, customer, "newsletter", "email", "withdrawn",
                       Proof("call_center", "agent:7"), catalog=get_catalog(session))
    session.close()
    after = client.post("/api/v1/decisions", json=question, headers=headers).get_json()
    assert after["decision"] == "deny" and after["reason"] == "withdrawn"
    assert after["evidence"]["source"] == "call_center"

    # the pool hands the connection on as it was: a write still runs in a transaction
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False
        conn.exec_driver_sql("CREATE TEMPORARY TABLE scratch (n int)")
        conn.rollback()
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'").scalar_one() == 0


def external_member(client: Any, headers: dict[str, str], crm_id: str, email: str
                    ) -> tuple[str, str]:
    """The customer with this email given the external id ``crm/<crm_id>`` and enrolled in the
    loyalty programme: (their public id, their member number)."""
    program = load_program(CATALOG)
    assert program is not None
    person = client.put(f"/api/v1/customers/external/crm/{crm_id}", json={"email": email},
                        headers=headers)
    assert person.status_code in (200, 201), person.get_json()
    customer_id = person.get_json()["id"]
    member = client.post("/api/v1/loyalty/members", headers=headers, json={
        "customer": customer_id, "terms_version": program.terms.version})
    assert member.status_code == 201, member.get_json()
    return customer_id, member.get_json()["member_number"]


def test_single_decisions_by_external_id_and_member_number_read_without_a_session(live):
    """Identifiers kept outside the customer row take the longer path (key, then the
    customer, then the facts), also on the session-free connection: the same answers as by
    email."""
    client, headers = live
    customer_id, number = external_member(client, headers, "C-42", "p2@example.com")
    for topic in ("newsletter", "offers", "account"):
        answers = [client.post("/api/v1/decisions", headers=headers, json={
            "customer": ref, "topic": topic, "channel": "email"}).get_json()
            for ref in ({"email": "p2@example.com"},
                        {"external_id": {"namespace": "crm", "value": "C-42"}},
                        {"member_number": number}, {"id": customer_id})]
        assert all(answer == answers[0] for answer in answers), (topic, answers)
        assert answers[0]["reason"] != "unknown_customer"
    ghost = client.post("/api/v1/decisions", headers=headers, json={
        "customer": {"external_id": {"namespace": "crm", "value": "nobody"}},
        "topic": "newsletter", "channel": "email"}).get_json()
    assert ghost["reason"] == "unknown_customer"


def test_a_batch_read_ahead_answers_every_kind_of_identifier_as_single_decisions(
        live, monkeypatch):
    """Parts read by the helper threads on connections of their own resolve external ids and
    member numbers too (the longer path), and answer exactly as single decisions."""
    monkeypatch.setattr(identity, "PART", 10)
    client, headers = live
    customer_id, number = external_member(client, headers, "C-7", "p7@example.com")
    refs = [{"email": "p7@example.com"}, {"external_id": {"namespace": "crm", "value": "C-7"}},
            {"member_number": number}, {"id": customer_id},
            {"external_id": {"namespace": "crm", "value": "nobody"}},
            {"email": "p8@example.com"}, {"email": "ghost@example.com"}]
    questions = [{"customer": refs[i % len(refs)],
                  "topic": ("newsletter", "offers", "account")[i % 3], "channel": "email"}
                 for i in range(63)]  # parts of 2, then 10: seven parts
    together = client.post("/api/v1/decisions/batch", json={"items": questions},
                           headers=headers)
    assert together.status_code == 200, together.get_json()
    for question, answer in zip(questions, together.get_json()["results"], strict=True):
        alone = client.post("/api/v1/decisions", json=question, headers=headers).get_json()
        assert answer == alone, question
    reasons = {answer["reason"] for answer in together.get_json()["results"]}
    assert "unknown_customer" in reasons and len(reasons) > 1
