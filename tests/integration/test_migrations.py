"""The Alembic history builds exactly the schema the models describe, on both databases,
and the ledger triggers exist after migrating."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

import portal.models  # noqa: F401
from portal.cli import alembic_config
from portal.db import Base, make_engine
from tests.support.databases import KINDS, fresh_database


@pytest.mark.parametrize("kind", KINDS)
def test_migrations_match_models_and_protect_the_ledger(kind, tmp_path):
    with fresh_database(kind, tmp_path) as url:
        engine = make_engine(url)
        with engine.begin() as connection:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection  # type: ignore[attr-defined]
            command.upgrade(cfg, "head")  # type: ignore[arg-type]
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            assert diff == []
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO customers (public_id, auth_epoch, created_at, updated_at) "
                "VALUES ('cus_t', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            connection.execute(text(
                "INSERT INTO consent_events (customer_id, topic_key, channel, state, source, "
                "actor, occurred_at) SELECT id, 'offers', 'email', 'granted', 'portal', 'x', "
                "CURRENT_TIMESTAMP FROM customers"))
        with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
            connection.execute(text("UPDATE consent_events SET state = 'withdrawn'"))
        with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
            connection.execute(text("DELETE FROM consent_events"))
        engine.dispose()
