"""Database wiring: one engine and sessionmaker per app, one Session per request.

Nothing here is imported back from the application package: models import :class:`Base`,
views call :func:`get_session`, services receive the Session as an argument.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy import BigInteger, DateTime, Engine, Integer, MetaData, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError
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
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    if url.startswith("postgresql"):
        # No JIT compilation: Carnet's statements are short lookups whose estimates can still
        # pass the JIT thresholds (a batch's 10,000 probes: 14 ms compiling for a 100 ms
        # query), and exports set it off anyway.
        connect_args = kwargs.setdefault("connect_args", {})
        given = connect_args.get("options") or make_url(url).query.get("options") or ""
        if not isinstance(given, str):
            given = " ".join(given)
        connect_args["options"] = f"{given} -c jit=off".strip()  # keeps the URL's own
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "postgresql" and not kwargs.get("pool_pre_ping"):
        _check_connections_on_checkout(engine)
    return engine


# A connection idle for longer than this is pinged over the wire before it is handed out.
PING_AFTER_IDLE_SECONDS = 30.0


def _check_connections_on_checkout(engine: Engine) -> None:
    """Hand out only live connections, without a round trip on the busy path.

    ``pool_pre_ping`` sends a query on every checkout: a sixth of a single decision's round
    trips. A server that ends a connection (restart, ``pg_terminate_backend``, a proxy or
    load balancer closing it) sends an error or closes the socket, so a dead idle connection
    has something to read; a live idle one never does. That check costs a ``poll()``. Only a
    connection idle for :data:`PING_AFTER_IDLE_SECONDS` (where a firewall may have dropped it
    silently) is pinged for real. A connection found dead is discarded and the pool tries
    another (``DisconnectionError``), so the request never sees it."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None:  # just connected
            return
        if not _looks_alive(dbapi_connection):
            raise DisconnectionError("the server closed the connection")
        if time.monotonic() - idle_since > PING_AFTER_IDLE_SECONDS:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:  # any failure means: not usable, take another
                raise DisconnectionError("ping failed") from exc


def _looks_alive(dbapi_connection: Any) -> bool:
    if getattr(dbapi_connection, "closed", False) or getattr(dbapi_connection, "broken", False):
        return False
    try:
        fd = dbapi_connection.fileno()
    except Exception:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    # Anything to read on an idle connection is the server's goodbye (or EOF).
    return not poller.poll(0)


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
    # Requests that only read run without an ORM Session on PostgreSQL (:func:`reads`): the
    # same pool, each checkout in autocommit.
    reading = (bind.execution_options(isolation_level="AUTOCOMMIT")
               if isinstance(bind, Engine) and bind.dialect.name == "postgresql" else None)
    app.extensions["carnet.db"] = {"bind": bind, "sessionmaker": factory, "reads": reading}
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


def read_outside_transactions(session: Session) -> None:
    """On PostgreSQL, run this Session's next statements in autocommit: a request that only
    reads (a decision) then sends no BEGIN and no COMMIT, two of its round trips. Each
    statement still reads one consistent snapshot, as under READ COMMITTED. Sessions bound to
    a test's connection, SQLite and a Session already in a transaction are left as they are;
    the pool restores the isolation level when the connection comes back."""
    bind = session.get_bind()
    if (isinstance(bind, Engine) and bind.dialect.name == "postgresql"
            and not session.in_transaction()):
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


@contextmanager
def reads() -> Iterator[Session | Connection]:
    """What a request that only reads, with plain rows (:mod:`portal.core.fast_rows`), reads from.

    On PostgreSQL, bound to an Engine: a Connection of the pool in autocommit, and no ORM
    Session at all. A single decision is one statement; the Session around it (creating it,
    checking its connection out through it, committing, closing, expunging) cost about a
    fifth of the served process's CPU for that request. Each statement reads the latest
    commits, as under :func:`read_outside_transactions`.

    Elsewhere (SQLite, a Session bound to a test's connection), or when the request's Session
    is already in a transaction: that Session, inside ``session.begin()``."""
    reading: Engine | None = current_app.extensions["carnet.db"]["reads"]
    current = g.get("db_session")
    if reading is not None and (current is None or not current.in_transaction()):
        with reading.connect() as conn:
            yield conn
        return
    session = get_session()
    with session.begin():
        yield session


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
