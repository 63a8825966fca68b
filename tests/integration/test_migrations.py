"""The Alembic history builds exactly the schema the models describe, on both databases,
and the ledger triggers exist after migrating."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

import portal.models  # noqa: F401
from portal.cli import alembic_config
from portal.core.db import Base, make_engine
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


@pytest.mark.parametrize("kind", KINDS)
def test_webhook_delivery_outcomes_are_backfilled_and_error_texts_dropped(kind, tmp_path):
    """0004 classes the existing attempts from ok/status_code and forgets the stored texts
    of network errors; the downgrade brings a column back without them."""
    with fresh_database(kind, tmp_path) as url:
        engine = make_engine(url)
        cfg = alembic_config(url)

        def migrate(step, revision: str) -> None:
            with engine.begin() as connection:
                cfg.attributes["connection"] = connection  # type: ignore[attr-defined]
                step(cfg, revision)  # type: ignore[arg-type]

        migrate(command.upgrade, "0003")
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO webhooks (public_id, url, event_types, secret, cursor_txid, "
                "cursor_id, failures, created_at) VALUES ('whk_m', 'https://h.example.com/', "
                "'[\"*\"]', 'whsec_m', 0, 0, 0, CURRENT_TIMESTAMP)"))
            for ok, status, error in ((True, 204, None), (False, 503, "HTTP 503"),
                                      (False, None, "ConnectError: [Errno 111] 10.0.0.5")):
                connection.execute(text(
                    "INSERT INTO webhook_deliveries (webhook_id, change_id, event_type, "
                    "attempt, ok, status_code, error, duration_ms, attempted_at) SELECT id, 1, "
                    "'customer.created', 1, :ok, :status, :error, 3, CURRENT_TIMESTAMP "
                    "FROM webhooks"), {"ok": ok, "status": status, "error": error})
        migrate(command.upgrade, "0004")
        with engine.connect() as connection:
            assert [r[0] for r in connection.execute(text(
                "SELECT outcome FROM webhook_deliveries ORDER BY id"))] == [
                "delivered", "http_error", "connection_failed"]
            columns = {c["name"] for c in inspect(connection).get_columns("webhook_deliveries")}
            assert "error" not in columns
        migrate(command.downgrade, "0003")
        with engine.connect() as connection:
            assert [r[0] for r in connection.execute(text(
                "SELECT error FROM webhook_deliveries ORDER BY id"))] == [
                None, "HTTP 503", "connection_failed"]
        engine.dispose()


@pytest.mark.parametrize("kind", KINDS)
def test_old_stop_replies_lose_the_number_from_the_ledger(kind, tmp_path):
    """0007 moves the number of STOP replies recorded before it from the append-only actor
    to the proof's erasable part (nowhere, for a customer already erased); the ledger stays
    append-only afterwards."""
    with fresh_database(kind, tmp_path) as url:
        engine = make_engine(url)
        cfg = alembic_config(url)

        def migrate(revision: str) -> None:
            with engine.begin() as connection:
                cfg.attributes["connection"] = connection  # type: ignore[attr-defined]
                command.upgrade(cfg, revision)  # type: ignore[arg-type]

        migrate("0006")
        with engine.begin() as connection:
            for public_id, erased, number in (("cus_a", None, "+33611111111"),
                                              ("cus_b", "2026-01-01", "+33622222222")):
                connection.execute(text(
                    "INSERT INTO customers (public_id, auth_epoch, created_at, updated_at, "
                    "erased_at) VALUES (:p, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :e)"),
                    {"p": public_id, "e": erased})
                for actor in (f"sms:{number}", "customer:portal"):
                    connection.execute(text(
                        "INSERT INTO consent_events (customer_id, topic_key, channel, state, "
                        "source, actor, occurred_at) SELECT id, '*', 'sms', 'withdrawn', "
                        "'sms', :actor, CURRENT_TIMESTAMP FROM customers WHERE public_id = :p"),
                        {"actor": actor, "p": public_id})
            connection.execute(text("INSERT INTO consent_proofs (event_id) "
                                    "SELECT id FROM consent_events"))
        migrate("0007")
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT c.public_id, e.actor, p.user_agent FROM consent_events e "
                "JOIN customers c ON c.id = e.customer_id "
                "JOIN consent_proofs p ON p.event_id = e.id ORDER BY e.id")).all()
        assert [tuple(r) for r in rows] == [
            ("cus_a", "sms-reply", "SMS from +33611111111"),
            ("cus_a", "customer:portal", None),
            ("cus_b", "sms-reply", None),
            ("cus_b", "customer:portal", None),
        ]
        with pytest.raises(Exception, match="append-only"), engine.begin() as connection:
            connection.execute(text("UPDATE consent_events SET actor = 'x'"))
        engine.dispose()
