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
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker
from sqlalchemy.orm.session import SessionTransactionOrigin
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


WRITE_OPTION = "carnet_write"


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
            write = conn.get_execution_options().get(WRITE_OPTION)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


class RequestSession(Session):
    """On PostgreSQL, :meth:`begin` adopts a transaction that reads have already opened
    (autobegin) instead of refusing to start: the API reads the caller's key first, and the
    view's ``with session.begin():`` then continues that transaction, so a request costs one
    connection checkout and one BEGIN/COMMIT instead of two. Under READ COMMITTED each
    statement sees the latest commits anyway, so nothing reads older data for it.

    Not on SQLite: there a transaction that has read cannot always be upgraded to a write
    while another writer commits, so the key lookup keeps its own short transaction (and
    round trips there cost nothing)."""

    @property
    def adopts_reads(self) -> bool:
        return self.get_bind().dialect.name == "postgresql"

    def begin(self, nested: bool = False) -> SessionTransaction:
        trans = self._transaction
        if (not nested and trans is not None and trans.origin is SessionTransactionOrigin.AUTOBEGIN
                and self.adopts_reads):
            return trans
        return super().begin(nested)


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
        class_=RequestSession,
        expire_on_commit=False,
        autobegin=True,
        join_transaction_mode="create_savepoint",
    )
    app.extensions["carnet.db"] = {"bind": bind, "sessionmaker": factory}
    app.teardown_appcontext(_close_session)


def get_session() -> RequestSession:
    """The request's Session, created on first use."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["carnet.db"]["sessionmaker"]()
    session: RequestSession = g.db_session
    return session


def get_engine(app: Flask) -> Engine | Connection:
    bind: Engine | Connection = app.extensions["carnet.db"]["bind"]
    return bind


def new_session(app: Flask) -> Session:
    """A Session outside any request (CLI commands, the worker)."""
    session: Session = app.extensions["carnet.db"]["sessionmaker"]()
    return session


def begin_write(session: Session) -> SessionTransaction:
    """``session.begin()`` for a transaction that reads, then writes.

    On SQLite it starts with ``BEGIN IMMEDIATE``. A deferred transaction that has read cannot
    take the write lock once another connection (the worker, another request) committed
    after its first read: SQLite answers "database is locked" at once, without waiting out
    the busy timeout (``SQLITE_BUSY_SNAPSHOT``). Taking the lock up front makes writers wait
    their turn instead. Other databases, and sessions bound to a test's connection, are
    unchanged.
    """
    transaction = session.begin()
    bind = session.get_bind()
    if isinstance(bind, Engine) and bind.dialect.name == "sqlite":
        session.connection(execution_options={WRITE_OPTION: True})
    return transaction


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
