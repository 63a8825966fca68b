"""The change feed cursor: commit order, no skips, no repeats — including with concurrent
writers on PostgreSQL, where ids are not assigned in commit order."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from portal.core.db import make_engine
from portal.outbox import changes, feed
from portal.outbox.models import Change
from tests.conftest import prepare_schema
from tests.support.databases import fresh_database


def test_cursor_round_trip_and_rejects_garbage():
    assert feed.Cursor.decode(feed.Cursor(7, 42).encode()) == feed.Cursor(7, 42)
    assert feed.Cursor.decode(None) == feed.Cursor(0, 0)
    for bad in ("abc", "1_", "_1", "1-2", "1_2_3", "9" * 30 + "_1"):
        with pytest.raises(feed.CursorError):
            feed.Cursor.decode(bad)


def test_type_patterns():
    assert feed.matches("consent.changed", ["*"])
    assert feed.matches("consent.changed", ["consent.*"])
    assert not feed.matches("customer.merged", ["consent.*", "suppression.added"])


def test_pages_in_order_without_repeats(session: Session):
    for i in range(25):
        changes.emit(session, "test.item", {"i": i}, None)
    session.flush()
    seen, cursor = [], feed.Cursor(0, 0)
    while True:
        rows, cursor = feed.read(session, cursor, 7)
        if not rows:
            break
        seen += [r.data["i"] for r in rows]
    assert seen == list(range(25))
    rows, same = feed.read(session, cursor, 7)
    assert rows == [] and same == cursor
    assert feed.head(session) == cursor


def test_concurrent_writers_are_seen_exactly_once(engine, tmp_path):
    """Writers hold their transaction open for random times, so ids commit out of order; a
    reader paging meanwhile must still see every change exactly once."""
    kind = engine.dialect.name
    with fresh_database(kind, tmp_path) as url:
        eng = make_engine(url)
        prepare_schema(eng)
        writers, per_writer = 6, 25
        errors: list[BaseException] = []

        def write(n: int) -> None:
            rng = random.Random(n)
            try:
                for i in range(per_writer):
                    with Session(eng) as s, s.begin():
                        changes.emit(s, "test.concurrent", {"w": n, "i": i}, None)
                        s.flush()
                        time.sleep(rng.uniform(0, 0.01))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
        for t in threads:
            t.start()
        seen: list[tuple[int, int]] = []
        cursor = feed.Cursor(0, 0)
        deadline = time.monotonic() + 60
        total = writers * per_writer
        while len(seen) < total and time.monotonic() < deadline:
            with Session(eng) as s, s.begin():
                rows, cursor = feed.read(s, cursor, 10)
                seen += [(r.data["w"], r.data["i"]) for r in rows]
            if not rows:
                time.sleep(0.002)
        for t in threads:
            t.join()
        assert not errors
        assert len(seen) == len(set(seen)) == total
        for n in range(writers):  # each writer's changes arrive in its own commit order
            assert [i for w, i in seen if w == n] == list(range(per_writer))
        with Session(eng) as s, s.begin():
            s.execute(delete(Change))
        eng.dispose()


def test_a_late_commit_with_a_smaller_id_is_not_skipped(engine, tmp_path):
    """The hazard itself: A takes id 1, B takes id 2 and commits first. An id cursor would
    pass 2 and never see 1; the feed waits for A, then gives 1 and 2."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises writers: the interleaving cannot happen")
    with fresh_database("postgresql", tmp_path) as url:
        eng = make_engine(url)
        prepare_schema(eng)
        a, b = Session(eng), Session(eng)
        try:
            a.begin()
            first = changes.emit(a, "test.late", {"n": "A"}, None)
            a.flush()
            with b.begin():
                second = changes.emit(b, "test.late", {"n": "B"}, None)
                b.flush()
            assert first.id < second.id
            with Session(eng) as reader, reader.begin():
                rows, cursor = feed.read(reader, feed.Cursor(0, 0), 10)
                assert rows == []
            a.commit()
            got: list[str] = []
            deadline = time.monotonic() + 30  # other transactions on the server hold xmin too
            while len(got) < 2 and time.monotonic() < deadline:
                with Session(eng) as reader, reader.begin():
                    rows, cursor = feed.read(reader, cursor, 10)
                    got += [r.data["n"] for r in rows]
            assert got == ["A", "B"]
        finally:
            a.close()
            b.close()
            eng.dispose()
