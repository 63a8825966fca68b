"""Many clients toggling the same customer's same preference at once, through the real
HTTP portal (each signed in with the emailed manage link) and the API's consent endpoint:
every accepted request has its event in the ledger, the current state is the last event,
and nothing answers 5xx.

PostgreSQL only: the per-customer row lock (``SELECT ... FOR UPDATE``) is what is under
test, and SQLite serialises every writer anyway.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

import pytest
import requests
from sqlalchemy import text

from portal.core.db import make_engine
from tests.faults.helpers import (
    LiveServer,
    add_customer,
    dispose,
    live_database,
    make_live_app,
    signed_in_browser,
)
from tests.support.api_client import make_key
from tests.support.databases import PG_URL

pytestmark = pytest.mark.skipif(
    not PG_URL, reason="row locks under real concurrency need PostgreSQL: set "
    "CARNET_TEST_DATABASE_URL")

THREADS, REQUESTS = 8, 25
CELL = ("offers", "sms")
SAVED, UNCHANGED = "Your preferences are saved.", "Nothing changed."


@pytest.fixture
def pg_url(tmp_path, app_name):
    with live_database("postgresql", tmp_path, app_name) as url:
        yield url


def page_form(browser: requests.Session, base: str, on: bool) -> dict[str, str]:
    html = browser.get(base + "/preferences", timeout=30).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert token
    form = {"csrf_token": token.group(1)}
    form.update(dict.fromkeys(re.findall(r'<input type="checkbox" name="([^"]+)"\s*checked',
                                         html), "on"))
    form.pop(f"c:{CELL[0]}:{CELL[1]}", None)
    if on:
        form[f"c:{CELL[0]}:{CELL[1]}"] = "on"
    return form


def test_parallel_toggles_lose_nothing(pg_url, tmp_path):
    app = make_live_app(pg_url, tmp_path, API_RATE_LIMIT="100000/60")
    engine = make_engine(pg_url)
    customer = add_customer(app, "toggle@example.com")
    key = make_key(app)
    statuses: Counter[int] = Counter()
    recorded = Counter()  # requests that say they recorded an event
    failures: list[str] = []
    lock = threading.Lock()
    try:
        with LiveServer(app) as server:
            browsers = [signed_in_browser(server, customer) for _ in range(THREADS // 2)]
            start = threading.Barrier(THREADS)

            def portal(browser: requests.Session, n: int) -> None:
                start.wait()
                for i in range(REQUESTS):
                    form = page_form(browser, server.url, on=(i + n) % 2 == 0)
                    r = browser.post(server.url + "/preferences", data=form, timeout=60)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 200 and SAVED in r.text:
                            recorded["portal"] += 1
                        elif r.status_code != 200 or UNCHANGED not in r.text:
                            failures.append(f"portal {r.status_code}: {r.text[:200]}")

            def api(n: int) -> None:
                session = requests.Session()
                start.wait()
                for i in range(REQUESTS):
                    r = session.post(
                        f"{server.url}/api/v1/customers/{customer.public_id}/consents",
                        json={"topic": CELL[0], "channel": CELL[1], "source": "call_center",
                              "state": "granted" if (i + n) % 2 else "withdrawn",
                              "actor": f"agent {n}"},
                        headers={"Authorization": f"Bearer {key}"}, timeout=60)
                    with lock:
                        statuses[r.status_code] += 1
                        if r.status_code == 201:
                            recorded["api"] += 1
                        else:
                            failures.append(f"api {r.status_code}: {r.text[:200]}")

            threads = [threading.Thread(target=portal, args=(b, n))
                       for n, b in enumerate(browsers)]
            threads += [threading.Thread(target=api, args=(n,)) for n in range(THREADS // 2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=180)
            assert not any(t.is_alive() for t in threads)
        assert failures == [], failures[:5]
        assert sum(statuses.values()) == THREADS * REQUESTS
        assert not [s for s in statuses if s >= 500], statuses
        assert recorded["api"] == (THREADS // 2) * REQUESTS
        assert recorded["portal"] > 0

        with engine.connect() as conn:
            events = conn.execute(text(
                "SELECT id, state, source FROM consent_events WHERE customer_id = :c AND "
                "topic_key = :t AND channel = :ch ORDER BY occurred_at, id"),
                {"c": customer.id, "t": CELL[0], "ch": CELL[1]}).all()
            state = conn.execute(text(
                "SELECT state, event_id FROM consent_states WHERE customer_id = :c AND "
                "topic_key = :t AND channel = :ch"),
                {"c": customer.id, "t": CELL[0], "ch": CELL[1]}).one()
            other_events = conn.execute(text(
                "SELECT count(*) FROM consent_events WHERE customer_id = :c AND NOT "
                "(topic_key = :t AND channel = :ch)"),
                {"c": customer.id, "t": CELL[0], "ch": CELL[1]}).scalar_one()
            changes = conn.execute(text(
                "SELECT count(*) FROM changes WHERE type = 'consent.changed' AND "
                "customer_id = :c"), {"c": customer.id}).scalar_one()
        assert len(events) == recorded["api"] + recorded["portal"]  # every one, no more
        assert other_events == 0  # nobody's stale page switched another cell
        assert changes == len(events)
        assert (state.event_id, state.state) == (events[-1].id, events[-1].state)
        # A portal save only records a real change: it never repeats the state before it.
        portal_repeats = [b for a, b in zip(events, events[1:], strict=False)
                          if b.source == "portal" and a.state == b.state]
        assert portal_repeats == []
    finally:
        engine.dispose()
        dispose(app)
