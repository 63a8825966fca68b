"""Idempotency keys for API writes: the first answer is kept and replayed.

Same key and same request → the stored status and body (``Idempotent-Replayed: true``); same
key and a different request → :class:`IdempotencyConflict` (422). Keys are scoped to the
caller (API key), so two clients cannot collide. The unique (actor, key) constraint settles two
simultaneous first requests: the loser's transaction fails and its retry replays the winner.

The API claims the key first (:func:`claim`), in the transaction that then makes the write, and
fills in the answer before committing (:func:`settle`). A concurrent request with the same key
blocks on the unique index (PostgreSQL) until the winner commits, then fails and replays it:
the write happens once and every caller gets the same answer. Nothing half-done is ever
visible, because the claim and the write commit or roll back together.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from portal.core.db import utcnow
from portal.loyalty.models import IdempotencyRecord


class IdempotencyConflict(ValueError):
    code = "idempotency_key_reused"


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\n".join([method.upper().encode(), path.encode(), body])).hexdigest()


def canonical_json(data: Any) -> bytes:
    """The body as a fingerprint sees it: key order and whitespace do not make two requests
    different."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def replay(session: Session, actor: str, key: str, print_: str) -> IdempotencyRecord | None:
    """The stored answer for this key, None for a new key; raises on a different request."""
    record = session.scalars(select(IdempotencyRecord).where(
        IdempotencyRecord.actor == actor, IdempotencyRecord.key == key)).first()
    if record is not None and record.fingerprint != print_:
        raise IdempotencyConflict("this Idempotency-Key was used for a different request")
    return record


def remember(session: Session, actor: str, key: str, print_: str, status: int,
             body: dict[str, Any]) -> IdempotencyRecord:
    """Store the answer in the same transaction as the write it describes."""
    record = IdempotencyRecord(actor=actor[:120], key=key[:255], fingerprint=print_,
                               status=status, body=body, created_at=utcnow())
    session.add(record)
    session.flush()
    return record


def claim(session: Session, actor: str, key: str, print_: str) -> IdempotencyRecord:
    """Take the key before the write it guards. Raises ``IntegrityError`` when the key is
    already taken (on PostgreSQL, after waiting for a concurrent holder to commit): roll back
    and :func:`replay`. The answer is a placeholder until :func:`settle`."""
    record = IdempotencyRecord(actor=actor[:120], key=key[:255], fingerprint=print_,
                               status=0, body={}, created_at=utcnow())
    session.add(record)
    session.flush()
    return record


def settle(session: Session, record: IdempotencyRecord, status: int,
           body: dict[str, Any]) -> None:
    """Keep the answer of a claimed key, in the transaction of the write it describes."""
    record.status, record.body = status, body
    session.flush()


def purge(session: Session, older_than: datetime) -> int:
    """Forget answers older than ``older_than``: a client retrying after that gets a fresh
    write (the source_ref uniqueness of earns still refuses a second credit for an order)."""
    result = session.execute(delete(IdempotencyRecord)
                             .where(IdempotencyRecord.created_at < older_than))
    return int(getattr(result, "rowcount", 0) or 0)
