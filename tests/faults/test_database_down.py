"""The database going away: every page and API call answers 503 with Retry-After (a friendly
localized page, or problem+json), never a 500 or a stack trace; when the database comes
back, the same running app serves again; a write that dies half-way leaves nothing
half-written.

The outage is real. On PostgreSQL the app reaches the server through a TCP proxy that the
test shuts (open connections reset, new ones refused) and reopens, or its connections are
terminated by the server (``pg_terminate_backend``, this test's connections only). On SQLite
the app starts with its database file missing, and the file appears later.
"""

from __future__ import annotations

import re
import shutil

import pytest
import requests
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from portal.core.db import get_engine, make_engine
from tests.faults.helpers import (
    LiveServer,
    TcpProxy,
    add_customer,
    count,
    dispose,
    live_database,
    make_live_app,
    manage_path,
    signed_in_browser,
    terminate_backends,
)
from tests.support.api_client import make_key
from tests.support.databases import PG_URL

LEAKS = re.compile(r"Traceback|sqlalchemy|psycopg|sqlite3|OperationalError|File \"",
                   re.IGNORECASE)
FRENCH_503 = "Le service est momentanément indisponible"
DECISION = {"customer": {"email": "ann@example.com"}, "topic": "offers", "channel": "email"}


def seed(app):
    """A customer, an API key and a session cookie, made while the database is up."""
    customer = add_customer(app, "ann@example.com", locale="fr")
    key = make_key(app)
    client = app.test_client()
    assert client.get(manage_path(app, customer)).status_code == 302
    cookie = client.get_cookie("carnet_session")
    assert cookie is not None
    return customer, key, cookie.value


def browser_with(cookie: str) -> requests.Session:
    browser = requests.Session()
    browser.cookies.set("carnet_session", cookie)
    return browser


def assert_unavailable(server: LiveServer, browser: requests.Session, key: str) -> None:
    page = browser.get(server.url + "/preferences", timeout=30,
                       headers={"Accept-Language": "fr"})
    assert page.status_code == 503, page.text[:500]
    assert page.headers["Retry-After"].isdigit()
    assert page.headers["Content-Type"].startswith("text/html")
    assert FRENCH_503 in page.text and not LEAKS.search(page.text)

    api = requests.post(server.url + "/api/v1/decisions", json=DECISION, timeout=30,
                        headers={"Authorization": f"Bearer {key}"})
    assert api.status_code == 503, api.text[:500]
    assert api.headers["Retry-After"].isdigit()
    assert api.headers["Content-Type"] == "application/problem+json"
    problem = api.json()
    assert problem["status"] == 503 and problem["type"].endswith("/unavailable")
    assert not LEAKS.search(api.text)


def assert_serving(server: LiveServer, browser: requests.Session, key: str) -> None:
    page = browser.get(server.url + "/preferences", timeout=30)
    assert page.status_code == 200 and "Retry-After" not in page.headers
    api = requests.post(server.url + "/api/v1/decisions", json=DECISION, timeout=30,
                        headers={"Authorization": f"Bearer {key}"})
    assert api.status_code == 200, api.text[:500]
    assert api.json()["reason"] == "not_consented"


def test_sqlite_file_missing_then_back_without_restart(tmp_path):
    source = tmp_path / "ready.db"
    setup = make_live_app(f"sqlite:///{source}", tmp_path / "setup")
    from tests.conftest import prepare_schema

    prepare_schema(get_engine(setup))
    _, key, cookie = seed(setup)
    dispose(setup)

    target = tmp_path / "mounted-later" / "carnet.db"  # the folder does not exist yet
    app = make_live_app(f"sqlite:///{target}", tmp_path / "app")
    try:
        with LiveServer(app) as server:
            browser = browser_with(cookie)
            assert_unavailable(server, browser, key)
            target.parent.mkdir()
            shutil.copy(source, target)
            assert_serving(server, browser, key)
    finally:
        dispose(app)


@pytest.fixture
def pg_url(tmp_path, app_name):
    if not PG_URL:
        pytest.skip("needs PostgreSQL: set CARNET_TEST_DATABASE_URL")
    with live_database("postgresql", tmp_path, app_name) as url:
        yield url


def test_postgresql_away_then_back_without_restart(pg_url, tmp_path):
    db_url = pg_url
    setup = make_live_app(db_url, tmp_path / "setup")
    customer, key, _ = seed(setup)
    dispose(setup)
    target = make_url(db_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432).up()
    app = make_live_app(proxy.url_for(db_url), tmp_path / "app")
    try:
        with LiveServer(app) as server:
            browser = signed_in_browser(server, customer)
            assert_serving(server, browser, key)  # pooled connections now exist
            # The database goes away while a signed-in customer's save is being written.
            fault = DieOn(get_engine(app), r"INSERT INTO consent_events\b", 1, proxy.down)
            form = preferences_form(browser, server, ["offers:sms"])
            fault.armed = True
            died = browser.post(server.url + "/preferences", data=form, timeout=30,
                                headers={"Accept-Language": "fr"})
            assert fault.killed, (died.status_code, died.url, died.text[:2000])
            assert died.status_code == 503, died.text[:300]
            assert died.headers["Retry-After"].isdigit() and not LEAKS.search(died.text)
            assert FRENCH_503 in died.text
            fault.remove()
            assert_unavailable(server, browser, key)
            assert_unavailable(server, browser, key)  # and again: no stuck connection
            proxy.up()
            assert_serving(server, browser, key)
    finally:
        proxy.down()
        dispose(app)


def test_postgresql_connections_terminated_are_replaced(pg_url, app_name, tmp_path):
    app = make_live_app(pg_url, tmp_path)
    _, key, cookie = seed(app)
    try:
        with LiveServer(app) as server:
            browser = browser_with(cookie)
            assert_serving(server, browser, key)
            assert terminate_backends(PG_URL, app_name) >= 1
            assert_serving(server, browser, key)  # dead connections are never handed out; no 5xx
    finally:
        dispose(app)


class DieOn:
    """Kills the database connection the ``n``-th time a statement matching ``pattern`` is
    about to run, as a crashed server or a cut network would: the transaction is lost."""

    def __init__(self, engine, pattern: str, n: int, action=None) -> None:
        self.engine, self.pattern, self.n = engine, re.compile(pattern, re.I), n
        self.action = action
        self.seen = 0
        self.killed = False
        self.armed = False
        event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, *_args) -> None:
        if not self.armed or not self.pattern.match(statement.lstrip()):
            return
        self.seen += 1
        if self.seen < self.n:
            return
        self.armed = False
        self.killed = True
        raw = conn.connection.dbapi_connection
        if self.action is not None:
            self.action()
        elif conn.dialect.name == "postgresql":
            admin = make_engine(PG_URL)
            with admin.begin() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"),
                              {"pid": raw.info.backend_pid})
            admin.dispose()
        else:
            raw.close()

    def remove(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self)


def ledger_counts(engine, customer_id: int) -> dict[str, int]:
    return {
        "events": count(engine, "SELECT count(*) FROM consent_events WHERE customer_id = :c",
                        c=customer_id),
        "proofs": count(engine, "SELECT count(*) FROM consent_proofs p JOIN consent_events e "
                        "ON e.id = p.event_id WHERE e.customer_id = :c", c=customer_id),
        "states": count(engine, "SELECT count(*) FROM consent_states WHERE customer_id = :c",
                        c=customer_id),
        "changes": count(engine, "SELECT count(*) FROM changes WHERE type = 'consent.changed' "
                         "AND customer_id = :c", c=customer_id),
        # a state must point at an event of the same cell, and be its latest
        "orphans": count(engine, "SELECT count(*) FROM consent_states s LEFT JOIN "
                         "consent_events e ON e.id = s.event_id AND e.customer_id = "
                         "s.customer_id WHERE s.customer_id = :c AND e.id IS NULL",
                         c=customer_id),
    }


def preferences_form(browser: requests.Session, server: LiveServer, cells: list[str]) -> dict:
    """The preference page as a browser would submit it, with ``cells`` switched on too."""
    html = browser.get(server.url + "/preferences", timeout=30).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html)
    assert token, "no CSRF token on the page"
    checked = re.findall(r'<input type="checkbox" name="([^"]+)"\s*checked', html)
    return {"csrf_token": token.group(1), **dict.fromkeys(checked, "on"),
            **{f"c:{cell}": "on" for cell in cells}}


def test_consent_save_dying_mid_write_leaves_nothing_half_written(db_url, tmp_path):
    app = make_live_app(db_url, tmp_path)
    engine = make_engine(db_url)
    try:
        customer = add_customer(app, "bea@example.com")
        key = make_key(app)
        with LiveServer(app) as server:
            browser = signed_in_browser(server, customer)
            fault = DieOn(get_engine(app), r"INSERT INTO consent_events\b", 2)
            form = preferences_form(browser, server, ["offers:sms", "events:sms"])
            fault.armed = True
            died = browser.post(server.url + "/preferences", data=form, timeout=30)
            assert fault.killed
            assert died.status_code == 503 and died.headers["Retry-After"].isdigit()
            assert "briefly unavailable" in died.text and not LEAKS.search(died.text)
            assert ledger_counts(engine, customer.id) == dict.fromkeys(
                ("events", "proofs", "states", "changes", "orphans"), 0)

            # The API's consent endpoint, killed between the event and the state.
            fault.seen, fault.n, fault.armed = 0, 1, True
            fault.pattern = re.compile(r"(INSERT INTO|UPDATE) consent_states\b", re.I)
            api = requests.post(
                f"{server.url}/api/v1/customers/{customer.public_id}/consents", timeout=30,
                headers={"Authorization": f"Bearer {key}"},
                json={"topic": "offers", "channel": "email", "state": "granted",
                      "source": "call_center", "actor": "agent 7"})
            assert fault.killed and api.status_code == 503, api.text[:300]
            assert api.headers["Content-Type"] == "application/problem+json"
            assert ledger_counts(engine, customer.id)["events"] == 0
            fault.remove()

            # Same form again, database healthy: both choices, each with its event.
            form = preferences_form(browser, server, ["offers:sms", "events:sms"])
            saved = browser.post(server.url + "/preferences", data=form, timeout=30)
            assert saved.status_code == 200 and "Your preferences are saved." in saved.text
            assert ledger_counts(engine, customer.id) == {
                "events": 2, "proofs": 2, "states": 2, "changes": 2, "orphans": 0}
    finally:
        engine.dispose()
        dispose(app)
