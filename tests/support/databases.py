"""Test databases: a fresh SQLite file, or a fresh schema in the PostgreSQL database named by
``CARNET_TEST_DATABASE_URL``. Nothing outside that schema is touched."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import text

from portal.core.db import make_engine

PG_URL = os.environ.get("CARNET_TEST_DATABASE_URL", "")
KINDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


@contextmanager
def fresh_database(kind: str, folder: Path) -> Iterator[str]:
    """Yield a SQLAlchemy URL for an empty database of ``kind``; remove it afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'carnet-{uuid.uuid4().hex[:8]}.db'}"
        return
    schema = f"carnet_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
