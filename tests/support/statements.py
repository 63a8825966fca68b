"""Count what a piece of code sends to the database: SQL statements, and round trips
(statements plus BEGIN, COMMIT and ROLLBACK, which the driver sends on its own)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    transaction_control: int = 0

    @property
    def round_trips(self) -> int:
        return len(self.statements) + self.transaction_control


@contextmanager
def counting(bind: Engine | Connection) -> Iterator[Tally]:
    """Record every statement executed through ``bind`` (an Engine, or the test's
    Connection) while the block runs."""
    target = bind.engine if isinstance(bind, Connection) else bind
    tally = Tally()

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        tally.statements.append(sql)

    def control(*_args: Any) -> None:
        tally.transaction_control += 1

    listeners = [("before_cursor_execute", statement), ("begin", control),
                 ("commit", control), ("rollback", control)]
    for name, fn in listeners:
        event.listen(target, name, fn)
    try:
        yield tally
    finally:
        for name, fn in listeners:
            event.remove(target, name, fn)
