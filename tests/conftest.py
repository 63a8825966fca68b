"""Shared fixtures. Every database test runs on SQLite and, when CARNET_TEST_DATABASE_URL is
set, on PostgreSQL too; each test runs inside a transaction that is rolled back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

import portal.models  # noqa: F401
from portal import create_app
from portal.core.config import ROOT
from portal.core.db import Base, make_engine
from portal.services import accounts
from portal.services.catalog import load_catalog_file, sync_catalog
from tests.support.databases import KINDS, fresh_database

CATALOG = ROOT / "portal" / "catalog.toml"


def prepare_schema(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        sync_catalog(session, load_catalog_file(CATALOG))


# Password hashing as portal/services/accounts.py sets it up for production, read before any
# test lowers it; and argon2's lowest cost, which the suite uses instead (about 0.1 ms a hash
# against 0.2 to 0.4 s on this kind of machine: tests sign in, sign up and change passwords
# by the hundred, and what they check does not depend on the cost).
PRODUCTION_PASSWORDS = accounts.passwords.to_dict()
PRODUCTION_DUMMY_HASH = accounts._DUMMY_HASH
CHEAP_ARGON2 = {"argon2__rounds": 1, "argon2__memory_cost": 8, "argon2__parallelism": 1}


def _password_cost(production: bool) -> None:
    """The context is changed in place, so every module holding it hashes alike; the dummy
    hash that unknown addresses are checked against follows, so that both paths still cost
    the same."""
    if production:
        accounts.passwords.load(PRODUCTION_PASSWORDS)
        accounts._DUMMY_HASH = PRODUCTION_DUMMY_HASH
    else:
        accounts.passwords.update(**CHEAP_ARGON2)
        accounts._DUMMY_HASH = accounts.passwords.hash("a dummy password for the tests")


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashing() -> Iterator[None]:
    """Every test hashes passwords at argon2's lowest cost, except under
    :func:`production_password_cost`. Hash in tests and fixtures, never when a module is
    imported: collection runs before this fixture, and such a hash would cost the full price
    at every sign-in (and be upgraded by it)."""
    _password_cost(production=False)
    yield
    _password_cost(production=True)


@pytest.fixture
def production_password_cost(cheap_password_hashing: None) -> Iterator[None]:
    """Hashing at its production cost for one test: the tests that measure that cost (answer
    times) or check its parameters."""
    _password_cost(production=True)
    yield
    _password_cost(production=False)


@pytest.fixture(scope="session", params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Engine]:
    with fresh_database(request.param, tmp_path_factory.mktemp("db")) as url:
        engine = make_engine(url)
        prepare_schema(engine)
        yield engine
        engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def session(connection: Connection) -> Iterator[Session]:
    s = Session(bind=connection, join_transaction_mode="create_savepoint",
                expire_on_commit=False)
    yield s
    s.close()


def app_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "TESTING": True,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "test-secret-key-not-for-production",
        "BASE_URL": "http://localhost",
        "SERVER_NAME": None,
    }
    config.update(overrides)
    return config


@pytest.fixture
def app(connection: Connection, tmp_path: Path) -> Flask:
    return create_app(app_config(tmp_path, CARNET_DB_BIND=connection))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"|'
                     r'type="hidden" name="csrf_token" value="([^"]+)"|'
                     r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "page has no CSRF token"
    return next(g for g in match.groups() if g)


def submit(client: FlaskClient, page: str, data: dict[str, Any], action: str | None = None,
           **kwargs: Any) -> Any:
    """Load ``page`` like a browser, take its CSRF token, and post ``data`` to ``action``."""
    html = client.get(page).get_data(as_text=True)
    payload = {"csrf_token": csrf_from(html), **data}
    return client.post(action or page, data=payload, **kwargs)


class Outbox:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def messages(self) -> list[EmailMessage]:
        if not self.folder.exists():
            return []
        files = sorted(self.folder.glob("*.eml"), key=lambda p: p.stat().st_mtime_ns)
        return [message_from_bytes(p.read_bytes(), policy=policy.default)  # type: ignore
                for p in files]

    def last(self, to: str | None = None) -> EmailMessage:
        found = [m for m in self.messages() if to is None or m["To"] == to]
        assert found, f"no email to {to}"
        return found[-1]

    def link(self, to: str | None = None, contains: str = "http") -> str:
        body = self.last(to).get_body(preferencelist=("plain",)).get_content()  # type: ignore
        for url in re.findall(r"https?://\S+", body):
            if contains in url:
                return str(url)
        raise AssertionError(f"no link containing {contains!r} in {body!r}")


@pytest.fixture
def outbox(app: Flask) -> Outbox:
    return Outbox(Path(app.instance_path) / "outbox")


def path_of(url: str) -> str:
    return re.sub(r"^https?://[^/]+", "", url)
