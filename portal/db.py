"""Database wiring: one engine and sessionmaker per app, one Session per request.

Nothing here is imported back from the application package: models import :class:`Base`,
views call :func:`get_session`, services receive the Session as an argument.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy import BigInteger, DateTime, Engine, Integer, MetaData, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the per-dialect settings Carnet relies on.

    SQLite gets foreign keys, WAL and a busy timeout, and its driver's implicit transaction
    handling is replaced by explicit BEGINs so SAVEPOINTs (used by the test suite and by
    ``session.begin_nested``) behave as on PostgreSQL.
    """
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {})["check_same_thread"] = False
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs.setdefault("poolclass", StaticPool)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def init_app(app: Flask) -> None:
    """Build the engine and sessionmaker once and keep them in ``app.extensions``.

    ``CARNET_DB_BIND`` (tests only) binds every Session to an existing Engine or Connection;
    with a Connection, each request's ``session.begin()`` becomes a SAVEPOINT inside the test's
    outer transaction, which the test rolls back.
    """
    bind = app.config.get("CARNET_DB_BIND")
    if bind is None:
        bind = make_engine(app.config["DATABASE_URL"])
    factory = sessionmaker(
        bind=bind,
        expire_on_commit=False,
        autobegin=True,
        join_transaction_mode="create_savepoint",
    )
    app.extensions["carnet.db"] = {"bind": bind, "sessionmaker": factory}
    app.teardown_appcontext(_close_session)


def get_session() -> Session:
    """The request's Session, created on first use."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["carnet.db"]["sessionmaker"]()
    session: Session = g.db_session
    return session


def get_engine(app: Flask) -> Engine | Connection:
    bind: Engine | Connection = app.extensions["carnet.db"]["bind"]
    return bind


def new_session(app: Flask) -> Session:
    """A Session outside any request (CLI commands, the worker)."""
    session: Session = app.extensions["carnet.db"]["sessionmaker"]()
    return session


def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Integer primary keys that are BIGINT on PostgreSQL and rowid aliases on SQLite.
BigID = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)
