"""The private parts of SQLAlchemy that ``portal/core/fast_rows.py`` reads are still there.

fast_rows runs compiled Core statements on the driver's cursor, so it relies on attributes
SQLAlchemy does not promise to keep: a release that renames one would break every decision
at run time with an ``AttributeError`` deep in a request. pyproject.toml bounds SQLAlchemy
below the next minor version; before raising that bound, this module must pass on the new
version. Each failure names the attribute that went missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Engine, bindparam, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.events import ConnectionEvents
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from portal.core import fast_rows
from portal.models.customer import Customer

DIALECTS: dict[str, Callable[[], Dialect]] = {
    "sqlite": sqlite.pysqlite.dialect,
    "postgresql": postgresql.psycopg.dialect,
}


def need(owner: Any, name: str, label: str | None = None) -> Any:
    """``owner.name``, or a failure that says which attribute fast_rows lost."""
    label = label or (owner.__name__ if isinstance(owner, type) else type(owner).__name__)
    if not hasattr(owner, name):
        pytest.fail(f"SQLAlchemy {sqlalchemy.__version__}: {label}.{name} is gone, and "
                    f"portal/core/fast_rows.py reads it", pytrace=False)
    return getattr(owner, name)


def statement() -> Any:
    """Like the decision lookups: a typed result column (UTCDateTime has a result processor
    on every dialect), a bind given at each call and one with a default value."""
    return (select(Customer.id, Customer.created_at)
            .where(Customer.email == bindparam("email"), Customer.auth_epoch >= 0))


@pytest.fixture(params=sorted(DIALECTS))
def dialect(request: pytest.FixtureRequest) -> Dialect:
    return DIALECTS[request.param]()


def test_a_compiled_statement_still_has_what_fast_rows_compiles_from(dialect: Dialect):
    compiled = statement().compile(dialect=dialect)  # an SQLCompiler of the dialect
    assert isinstance(need(compiled, "string"), str)
    binds = need(compiled, "binds")
    bind_names = need(compiled, "bind_names")
    assert isinstance(binds, Mapping) and isinstance(bind_names, Mapping)
    for bind in binds.values():
        assert isinstance(bind, BindParameter)
        need(bind, "required")
        need(bind, "effective_value")
        assert bind_names[bind] in binds, "SQLCompiler.bind_names no longer names the binds"
    assert isinstance(need(compiled, "_bind_processors"), Mapping)
    positional = need(compiled, "positional")
    if positional:
        assert set(need(compiled, "positiontup")) == set(bind_names.values())
    columns = need(compiled, "_result_columns")
    assert len(columns) == 2
    for entry in columns:
        assert len(entry) == 4, ("SQLCompiler._result_columns entries are no longer "
                                 "(keyname, name, objects, type)")
        type_ = entry[3]
        assert isinstance(type_, TypeEngine)
        processor = need(type_, "_cached_result_processor", "TypeEngine")(dialect, None)
        assert processor is None or callable(processor)


def test_fast_rows_compiles_the_same_statement_as_sqlalchemy_would_run_it(dialect: Dialect):
    """The pieces read above, put together: the bind with a default keeps its value, the
    other is asked for at each call, and the UTCDateTime column is converted."""
    entry = fast_rows._compile(statement(), dialect, cached=False)
    assert sorted(entry.defaults.values()) == [0]
    assert [index for index, _ in entry.result_processors] == [1]
    arguments = fast_rows._arguments(entry, {"email": "ann@example.com"})
    values = arguments if isinstance(arguments, list) else list(arguments.values())
    assert "ann@example.com" in values and 0 in values
    if dialect.name == "postgresql":
        assert "$1" in entry.native_sql and "%(" not in entry.native_sql


def test_a_connection_still_has_what_fast_rows_runs_statements_with():
    for owner in (Connection, Engine):
        need(owner, "_has_events")
    need(Connection, "dispatch")
    need(Connection, "connection")
    handle = need(Connection, "_handle_dbapi_exception")
    try:  # fast_rows: (exception, statement, parameters, cursor, context)
        inspect.signature(handle).bind(None, Exception(), "", (), None, None)
    except TypeError as exc:
        pytest.fail(f"SQLAlchemy {sqlalchemy.__version__}: "
                    f"Connection._handle_dbapi_exception takes other arguments: {exc}",
                    pytrace=False)
    listener = need(ConnectionEvents, "before_cursor_execute")
    assert list(inspect.signature(listener).parameters)[1:] == [
        "conn", "cursor", "statement", "parameters", "context", "executemany"]
    for make in DIALECTS.values():
        need(type(make()), "loaded_dbapi")


def test_a_live_connection_answers_as_fast_rows_expects(connection: Connection):
    """The same, on a connection of each test database (the instance attributes)."""
    assert isinstance(need(connection, "_has_events"), bool)
    assert isinstance(need(need(connection, "engine"), "_has_events"), bool)
    need(need(connection, "dispatch"), "before_cursor_execute")
    assert issubclass(need(connection.dialect, "loaded_dbapi").Error, Exception)
    need(connection.connection, "dbapi_connection").cursor().close()
    assert fast_rows.fetch_rows(connection, select(literal(1))) == [(1,)]
