"""Plain rows from a Core select, on the driver's cursor: the hot path of decisions.

A decision runs three small selects. Through ``Connection.execute`` each cost about 110 µs of
CPU more than the same statement on the driver's cursor (measured with
``bench/bench_decisions.py``'s data): the execution context, the result object, and psycopg
building a column description that only the result object reads. :func:`fetch_rows` keeps
what matters of that path and drops the rest:

* the statement is still a SQLAlchemy Core select, compiled once per dialect, with the same
  bind and result type processing (``UTCDateTime``, JSON parameters on SQLite);
* on PostgreSQL it is a server-side prepared statement (planned once per connection),
  sent with PostgreSQL's own ``$1`` placeholders through psycopg's ``RawCursor``: psycopg
  parses a query's ``%(name)s`` placeholders on every execution when the text is longer than
  its cache takes (4 KB: a single decision's statement is just over, a batch's 7 KB), which
  was 5 to 9 % of a single decision's CPU in the served process;
* ``before_cursor_execute`` listeners still see every statement (the tests count them and
  inject faults there);
* driver errors go through SQLAlchemy's own handling: wrapped in ``sqlalchemy.exc`` types,
  and a lost connection invalidates the pool, exactly as for any other statement.

It returns tuples in column order and nothing else: no ORM objects, no autoflush.
"""

from __future__ import annotations

import re
import select
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable


@dataclass(frozen=True)
class _Compiled:
    sql: str
    defaults: dict[str, Any]
    positional: tuple[str, ...] | None  # parameter order for qmark drivers (SQLite)
    bind_processors: dict[str, Callable[[Any], Any]]
    result_processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column, processor)
    prepare: bool
    # PostgreSQL: the statement with $1, $2... and the parameter name of each number
    native_sql: str = ""
    native_order: tuple[str, ...] = ()


_PYFORMAT = re.compile(r"%%|%\(([^)]+)\)s")


def _native(sql: str) -> tuple[str, tuple[str, ...]]:
    """``%(name)s`` placeholders (psycopg's format, ``%%`` for a literal ``%``) turned into
    PostgreSQL's ``$n``, a name used twice keeping its number; with the names in order."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return _PYFORMAT.sub(number, sql), tuple(order)


_COMPILED: dict[tuple[int, str], tuple[Executable, _Compiled]] = {}


def _compile(statement: Executable, dialect: Dialect, *, cached: bool = True) -> _Compiled:
    key = (id(statement), dialect.name)
    hit = _COMPILED.get(key) if cached else None
    if hit is not None and hit[0] is statement:
        return hit[1]
    compiled: Any = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    defaults = {compiled.bind_names[bind]: bind.effective_value
                for bind in compiled.binds.values() if not bind.required}
    processors = [type_._cached_result_processor(dialect, None)
                  for _key, _name, _objects, type_ in compiled._result_columns]
    postgresql = dialect.name == "postgresql"
    native_sql, native_order = _native(compiled.string) if postgresql else ("", ())
    entry = _Compiled(
        sql=compiled.string,
        defaults=defaults,
        positional=tuple(compiled.positiontup) if compiled.positional else None,
        bind_processors=dict(compiled._bind_processors),
        result_processors=tuple((i, p) for i, p in enumerate(processors) if p is not None),
        prepare=postgresql,
        native_sql=native_sql,
        native_order=native_order,
    )
    if cached:
        _COMPILED[key] = (statement, entry)  # the statement is kept: its id stays unique
    return entry


def _arguments(entry: _Compiled, params: Mapping[str, Any] | None) -> Any:
    values = dict(entry.defaults)
    if params:
        values.update(params)
    for name, process in entry.bind_processors.items():
        if name in values:
            values[name] = process(values[name])
    return values if entry.positional is None else [values[n] for n in entry.positional]


T = TypeVar("T")
R = TypeVar("R")

# What plain rows are read from: the request's Session, or a Connection of its own (a request
# that only reads on PostgreSQL: :func:`portal.core.db.reads`).
Reader = Session | Connection


def dialect_of(reader: Reader) -> str:
    """The name of the database dialect ``reader`` reads from."""
    bind = reader.get_bind() if isinstance(reader, Session) else reader
    return bind.dialect.name


def flushed(reader: Reader) -> None:
    """Before plain-row reads: they do not autoflush a Session's pending ORM changes."""
    if isinstance(reader, Session):
        reader.flush()


def _connection(reader: Reader) -> Connection:
    return reader.connection() if isinstance(reader, Session) else reader


def fetch_rows(reader: Reader, statement: Executable, params: Mapping[str, Any] | None = None
               ) -> list[tuple[Any, ...]]:
    """Every row of ``statement`` (a module-level, reused Core select) as plain tuples."""
    return _fetch(_connection(reader), statement, params)


# A list parameter at least this long is split across two connections by fetch_rows_split.
SPLIT_AT = 2000
_split_pool: ThreadPoolExecutor | None = None
_helping = threading.local()  # set in the pool's threads


def fetch_rows_split(reader: Reader, statement: Executable, params: Mapping[str, Any],
                     name: str) -> list[tuple[Any, ...]]:
    """:func:`fetch_rows` with the list parameter ``name`` cut in two halves, read at the same
    time on two connections, so that PostgreSQL works on both cores: a batch decision's
    lookups are 10,000 index probes or more, and they were most of its time.

    Only when nothing could differ between the two connections: PostgreSQL, a Session bound
    to an Engine (or a Connection of its pool), running outside any transaction
    (:func:`portal.core.db.read_outside_transactions`, :func:`portal.core.db.reads`: read-only
    operations), where each statement sees the latest commits anyway. Otherwise, and for
    short lists, it is :func:`fetch_rows`."""
    values = params[name]
    conn = _connection(reader)
    if len(values) < SPLIT_AT or not reads_beside(reader):
        return _fetch(conn, statement, params)
    half = len(values) // 2
    other = _pool().submit(_fetch_beside, conn.engine, statement,
                           {**params, name: values[half:]})
    rows = _fetch(conn, statement, {**params, name: values[:half]})
    return rows + other.result()


def reads_beside(reader: Reader) -> bool:
    """Whether other connections of the reader's pool may read for it
    (:func:`fetch_rows_split`, :func:`read_ahead`): on PostgreSQL, for a Session bound to an
    Engine (or a Connection of its pool) running outside any transaction, where each
    statement sees the latest commits whichever connection runs it."""
    if getattr(_helping, "active", False):
        return False  # a helper thread does not ask the pool for more help: no deadlock
    conn = _connection(reader)
    return (conn.dialect.name == "postgresql"
            and not (isinstance(reader, Session) and not isinstance(reader.get_bind(), Engine))
            and bool(getattr(conn.connection.dbapi_connection, "autocommit", False)))


def _pool() -> ThreadPoolExecutor:
    global _split_pool
    if _split_pool is None:  # made in the serving process, after any fork
        _split_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="carnet-split")
    return _split_pool


def read_ahead(reader: Reader, read: Callable[[Reader, T], R], parts: Sequence[T], *,
               lanes: int = 2) -> Iterator[R]:
    """``read(reader, part)`` for each part, in order. Where other connections may read for
    the reader (:func:`reads_beside`), ``lanes`` helper threads read the parts ahead of the
    caller, each on a connection of its own, taking every ``lanes``-th part in turn, while
    the caller handles each part as soon as it is read: a long batch's reads then overlap
    its Python work instead of preceding it. Otherwise each part is read when the caller
    reaches it. An error while reading a part is raised when the caller reaches that part;
    if the caller stops early, the helpers stop after the part they are reading."""
    if len(parts) < 2 or not reads_beside(reader):
        for part in parts:
            yield read(reader, part)
        return
    engine = _connection(reader).engine
    results: list[Future[R]] = [Future() for _ in parts]
    stop = threading.Event()

    def lane(first: int) -> None:
        _helping.active = True
        index = first
        try:
            with engine.connect() as conn:
                other = conn.execution_options(isolation_level="AUTOCOMMIT")
                for index in range(first, len(parts), lanes):
                    if stop.is_set():
                        return
                    results[index].set_result(read(other, parts[index]))
        except BaseException as exc:  # handed to the caller, who raises it
            pending = next((i for i in range(index, len(parts), lanes)
                            if not results[i].done()), None)
            if pending is not None:
                results[pending].set_exception(exc)

    helpers = [_pool().submit(lane, first) for first in range(min(lanes, len(parts)))]
    try:
        for result in results:
            yield result.result()
    finally:
        stop.set()
        for helper in helpers:
            helper.result()


def _fetch_beside(engine: Engine, statement: Executable, params: Mapping[str, Any]
                  ) -> list[tuple[Any, ...]]:
    _helping.active = True
    with engine.connect() as conn:
        return _fetch(conn.execution_options(isolation_level="AUTOCOMMIT"), statement, params)


@contextmanager
def _statement(conn: Connection, cursor: Any, sql: str, args: Any) -> Iterator[None]:
    """Around a statement on the driver's cursor what ``Connection.execute`` would do:
    ``before_cursor_execute`` listeners first; driver errors wrapped by SQLAlchemy (a lost
    connection invalidates the pool); the cursor closed however it ends."""
    try:
        if conn._has_events or conn.engine._has_events:
            conn.dispatch.before_cursor_execute(conn, cursor, sql, args, None, False)
        yield
    except conn.dialect.loaded_dbapi.Error as exc:
        conn._handle_dbapi_exception(exc, sql, args, cursor, None)  # raises
    finally:
        cursor.close()


def _fetch(conn: Connection, statement: Executable, params: Mapping[str, Any] | None
           ) -> list[tuple[Any, ...]]:
    entry = _compile(statement, conn.dialect)
    args = _arguments(entry, params)
    dbapi: Any = conn.connection.dbapi_connection
    if entry.prepare:
        cursor: Any = psycopg.RawCursor(dbapi)
        sql, args = entry.native_sql, [args[name] for name in entry.native_order]
        options = {"prepare": True}
    else:
        cursor, sql, options = dbapi.cursor(), entry.sql, {}
    with _statement(conn, cursor, sql, args):
        cursor.execute(sql, args, **options)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    if entry.result_processors and rows:
        rows = [_processed(row, entry.result_processors) for row in rows]
    return rows


def stream_rows(session: Session, statement: Executable, params: Mapping[str, Any] | None,
                chunk: int) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``statement`` ``chunk`` at a time, in constant memory: through a
    server-side cursor on PostgreSQL (inside the Session's transaction), stepping the
    cursor on SQLite. Built for each call (an export's statement depends on its topic)."""
    conn = session.connection()
    entry = _compile(statement, conn.dialect, cached=False)
    args = _arguments(entry, params)
    raw: Any = conn.connection.dbapi_connection
    postgresql = conn.dialect.name == "postgresql"
    cursor: Any = raw.cursor(name="carnet_stream") if postgresql else raw.cursor()
    with _statement(conn, cursor, entry.sql, args):
        cursor.execute(entry.sql, args)
        while True:
            rows: list[tuple[Any, ...]] = cursor.fetchmany(chunk)
            if not rows:
                break
            if entry.result_processors:
                rows = [_processed(row, entry.result_processors) for row in rows]
            yield rows


def _processed(row: tuple[Any, ...], processors: tuple[tuple[int, Callable[[Any], Any]], ...]
               ) -> tuple[Any, ...]:
    """The row with its typed columns converted (usually one or two of a dozen)."""
    if all(row[index] is None for index, _ in processors):
        return row
    values = list(row)
    for index, process in processors:
        if values[index] is not None:
            values[index] = process(values[index])
    return tuple(values)


def copy_out(session: Session, statement: Executable, params: Mapping[str, Any] | None,
             *, block_bytes: int = 256 * 1024) -> Iterator[bytes]:
    """``COPY (statement) TO STDOUT`` on PostgreSQL: the rows in COPY's text format (tab
    between columns, ``\\N`` for NULL, backslash escapes), in blocks of whole lines of about
    ``block_bytes``. The server sends rows as it finds them, so it keeps working while the
    caller handles the previous block; memory holds one block.

    COPY sends one message per row. psycopg's ``Copy`` reads each through its generator
    machinery (a few microseconds a row: most of an export's own CPU), so the rows are read
    here from libpq directly (``PGconn.get_copy_data``), as many as it has buffered per
    wake-up. The parameters are merged client-side, as ``Cursor.copy`` does (COPY takes no
    bind parameters)."""
    conn = session.connection()
    entry = _compile(statement, conn.dialect, cached=False)
    args = _arguments(entry, params)
    sql = f"COPY ({entry.sql}) TO STDOUT"
    dbapi: Any = conn.connection.dbapi_connection
    cursor = psycopg.ClientCursor(dbapi)
    with _statement(conn, cursor, sql, args):
        query = cursor.mogrify(sql, args).encode(dbapi.info.encoding)
        yield from _copy_blocks(dbapi, query, block_bytes)


def _copy_blocks(dbapi: Any, query: bytes, block_bytes: int) -> Iterator[bytes]:
    pgconn = dbapi.pgconn
    poll = select.poll()
    poll.register(pgconn.socket, select.POLLIN)

    def results() -> list[Any]:
        """Every result of the command, waiting without blocking the GIL."""
        found: list[Any] = []
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                poll.poll()
                continue
            result = pgconn.get_result()
            if result is None:
                return found
            found.append(result)
            if result.status == pq.ExecStatus.COPY_OUT:
                return found

    def check(result: Any, expected: pq.ExecStatus) -> None:
        if result.status != expected:
            raise psycopg.errors.error_from_result(result, encoding=dbapi.info.encoding)

    pgconn.send_query(query)
    [*_, started] = results()
    check(started, pq.ExecStatus.COPY_OUT)
    finished = False
    try:
        parts: list[bytes] = []
        size = 0
        read = pgconn.get_copy_data
        while True:
            nbytes, data = read(1)
            if nbytes > 0:
                parts.append(bytes(data))
                size += nbytes
                if size >= block_bytes:
                    yield b"".join(parts)
                    parts, size = [], 0
            elif nbytes == 0:  # nothing buffered: wait for the server
                poll.poll()
                pgconn.consume_input()
            else:  # the end of the COPY, then its outcome
                finished = True
                for result in results():
                    check(result, pq.ExecStatus.COMMAND_OK)
                break
        if parts:
            yield b"".join(parts)
    finally:
        if not finished:  # the reader stopped early: cancel, then drain to a usable state
            dbapi.cancel_safe()
            while (read := pgconn.get_copy_data(1))[0] >= 0:
                if read[0] == 0:
                    poll.poll()
                    pgconn.consume_input()
            results()
