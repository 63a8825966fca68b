"""Writing to the change feed (the outbox webhooks and the events API read from)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from portal.models.change import Change


def current_txid(session: Session) -> int:
    """The writer's transaction id on PostgreSQL; 0 on SQLite, where writers are serialised
    and ids are therefore already in commit order."""
    if session.get_bind().dialect.name == "postgresql":
        return int(session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one())
    return 0


def emit(session: Session, type_: str, data: dict[str, Any], customer_id: int | None) -> Change:
    """Append a change in the caller's transaction; it becomes visible when that commits."""
    change = Change(type=type_, data=data, customer_id=customer_id, txid=current_txid(session))
    session.add(change)
    return change
