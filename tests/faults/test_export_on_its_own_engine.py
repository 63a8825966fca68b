"""The NDJSON export as it runs in production on PostgreSQL: bound to an Engine, the people
under contact pressure are judged on a second connection, in a thread, while COPY writes
everyone else's lines. Together they must be exactly the members the paginated export (row by
row, one connection) lists, and nobody twice."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from portal.db import new_session, utcnow
from portal.models.consent import ContactRule, Dispatch
from portal.services.accounts import create_customer
from portal.services.catalog import get_catalog
from portal.services.consent import Proof, record_consent
from tests.faults.helpers import dispose, live_database, make_live_app
from tests.support.api_client import make_key
from tests.support.databases import PG_URL

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


def test_ndjson_export_on_an_engine_lists_each_member_once(tmp_path):
    with live_database("postgresql", tmp_path) as url:
        app = make_live_app(url, tmp_path)
        try:
            seed(app, 120)
            key = make_key(app, "audiences:read")
            client = app.test_client()
            headers = {"Authorization": f"Bearer {key}"}
            response = client.get("/api/v1/audiences/newsletter/email",
                                  headers={**headers, "Accept": "application/x-ndjson"})
            assert response.status_code == 200
            streamed = [orjson.loads(line) for line in response.data.splitlines()]
            paged, cursor = [], None
            while True:
                page = client.get("/api/v1/audiences/newsletter/email",
                                  query_string={"limit": 50, **({"cursor": cursor} if cursor
                                                                else {})},
                                  headers=headers).get_json()
                paged += page["items"]
                if not (cursor := page["next_cursor"]):
                    break
        finally:
            dispose(app)
    emails = [member["contact"]["email"] for member in streamed]
    assert len(emails) == len(set(emails))  # nobody twice
    assert sorted(emails) == sorted(m["contact"]["email"] for m in paged)
    capped_free = {f"p{i}@example.com" for i in range(120) if i % 7 and i % 3 == 0
                   and i % 2}
    reached = {f"p{i}@example.com" for i in range(120) if i % 7 and i % 6 == 0}
    assert capped_free <= set(emails)  # the thread's part arrived
    assert not reached & set(emails)   # deferred people stay out
    assert len(emails) == len([i for i in range(120) if i % 7]) - len(reached)
