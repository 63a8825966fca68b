"""Reading the change feed in commit order with a cursor that never skips or repeats.

On PostgreSQL ids come from a sequence at insert time, not at commit, so a reader ordering by
id alone could pass id 41 while the transaction holding id 40 is still running, and never see
40. Each change therefore carries its writer's transaction id; rows are read in (txid, id)
order and only once their txid is older than every transaction still running
(``pg_snapshot_xmin``): nothing can later appear behind the cursor. On SQLite writers are
serialised (one write lock per database), so id order is commit order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, text
from sqlalchemy.orm import Session

from portal.models.customer import Customer
from portal.outbox.models import Change

CURSOR_RE = re.compile(r"([0-9]{1,19})_([0-9]{1,19})")


class CursorError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Cursor:
    txid: int
    id: int

    def encode(self) -> str:
        return f"{self.txid}_{self.id}"

    @classmethod
    def decode(cls, raw: str | None) -> Cursor:
        if not raw:
            return cls(0, 0)
        match = CURSOR_RE.fullmatch(raw)
        if match is None:
            raise CursorError("not a cursor given by this API")
        return cls(int(match.group(1)), int(match.group(2)))


def _visible(session: Session) -> Any:
    if session.get_bind().dialect.name != "postgresql":
        return None
    horizon = int(session.execute(
        text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")).scalar_one())
    # The reader's own uncommitted changes (only when it wrote in the same transaction).
    own = session.execute(text("SELECT pg_current_xact_id_if_assigned()::text::bigint")
                          ).scalar_one()
    condition = Change.txid < horizon
    return or_(condition, Change.txid == int(own)) if own is not None else condition


def read(session: Session, after: Cursor, limit: int,
         types: list[str] | None = None) -> tuple[list[Change], Cursor]:
    """Up to ``limit`` changes after ``after`` and the cursor to continue from. With
    ``types``, other changes are skipped but still move the cursor."""
    query = select(Change).where(or_(
        Change.txid > after.txid, and_(Change.txid == after.txid, Change.id > after.id)))
    visible = _visible(session)
    if visible is not None:
        query = query.where(visible)
    rows = list(session.scalars(query.order_by(Change.txid, Change.id).limit(limit)))
    cursor = Cursor(rows[-1].txid, rows[-1].id) if rows else after
    if types:
        rows = [r for r in rows if matches(r.type, types)]
    return rows, cursor


def head(session: Session) -> Cursor:
    """The cursor after every change visible now: where a new subscriber starts."""
    query = select(Change.txid, Change.id)
    visible = _visible(session)
    if visible is not None:
        query = query.where(visible)
    row = session.execute(query.order_by(Change.txid.desc(), Change.id.desc()).limit(1)).first()
    return Cursor(int(row[0]), int(row[1])) if row else Cursor(0, 0)


def matches(type_: str, patterns: list[str]) -> bool:
    """``*`` matches all, ``consent.*`` a family, anything else exactly."""
    for pattern in patterns:
        if pattern == "*" or pattern == type_:
            return True
        if pattern.endswith(".*") and type_.startswith(pattern[:-1]):
            return True
    return False


def as_json(session: Session, rows: list[Change]) -> list[dict[str, Any]]:
    ids = {r.customer_id for r in rows if r.customer_id}
    public = dict(session.execute(select(Customer.id, Customer.public_id)
                                  .where(Customer.id.in_(ids))).all()) if ids else {}
    return [event_json(r, public.get(r.customer_id) if r.customer_id else None) for r in rows]


def event_json(row: Change, customer: str | None) -> dict[str, Any]:
    return {
        "id": Cursor(row.txid, row.id).encode(), "sequence": row.id, "type": row.type,
        "customer": customer, "occurred_at": row.occurred_at.isoformat(), "data": row.data,
    }
