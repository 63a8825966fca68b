"""Writing to the change feed (the outbox webhooks and the events API read from)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import literal_column, text
from sqlalchemy.orm import Session

from portal.outbox.models import Change

_TXID_KEY = "carnet.txid"
# Evaluated by PostgreSQL inside the INSERT itself, so writing a change costs no extra round
# trip for the writer's transaction id.
_PG_TXID: Any = literal_column("pg_current_xact_id()::text::bigint")


def current_txid(session: Session) -> int:
    """The writer's transaction id on PostgreSQL; 0 on SQLite, where writers are serialised
    and ids are therefore already in commit order.

    It cannot change within a transaction, so it is asked once per transaction and kept in
    ``session.info`` next to the transaction it belongs to.
    """
    if session.get_bind().dialect.name != "postgresql":
        return 0
    transaction = session.get_transaction()
    cached = session.info.get(_TXID_KEY)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return int(cached[1])
    txid = int(session.execute(text("SELECT pg_current_xact_id()::text::bigint")).scalar_one())
    session.info[_TXID_KEY] = (session.get_transaction(), txid)
    return txid


def emit(session: Session, type_: str, data: dict[str, Any], customer_id: int | None) -> Change:
    """Append a change in the caller's transaction; it becomes visible when that commits."""
    txid: Any = 0
    if session.get_bind().dialect.name == "postgresql":
        cached = session.info.get(_TXID_KEY)
        if cached is not None and cached[0] is session.get_transaction():
            txid = int(cached[1])
        else:
            txid = _PG_TXID
    change = Change(type=type_, data=data, customer_id=customer_id, txid=txid)
    session.add(change)
    return change
