"""Every `flask --app app ...` command, run as an operator runs it (through the app's CLI),
checked by what it prints and what it leaves in the database; and in each group, one mistake
that is refused with a clear message, a non-zero exit and nothing written.

``COVERED`` names the test that runs each command; a command without one fails the suite."""

from __future__ import annotations

import importlib
from datetime import timedelta
from pathlib import Path

import click
import pytest
from alembic.script import ScriptDirectory
from flask import Flask
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from portal import create_app
from portal.cli import alembic_config
from portal.core.db import make_engine, utcnow
from portal.loyalty import ledger
from portal.loyalty.models import Member
from portal.loyalty.program import LoyaltyProgram, add_months, load_program
from portal.models.api import ApiKey
from portal.models.catalog import TopicWording
from portal.models.consent import ContactRule
from portal.models.customer import Customer, SignInSession
from portal.services.accounts import create_customer, find_by_email
from portal.services.consent import Proof
from portal.services.demo import DEMO_EMAIL
from tests.conftest import CATALOG, app_config
from tests.support.databases import KINDS, fresh_database

_LOADED = load_program(CATALOG)
assert _LOADED is not None
PROGRAM: LoyaltyProgram = _LOADED
PROOF = Proof("portal", "customer:test", "203.0.113.9", "pytest")
PRODUCTION = {"ENV": "production", "TESTING": False, "SMTP_URL": "smtp://127.0.0.1:2525",
              "SECRET_KEY": "a-real-production-secret-0123456789"}

THIS = "tests.integration.test_cli_commands"
# Command path -> "module::test" that invokes it through the app's CLI.
COVERED: dict[str, str] = {
    "api-keys create": f"{THIS}::test_api_keys_create_list_revoke",
    "api-keys list": f"{THIS}::test_api_keys_create_list_revoke",
    "api-keys revoke": f"{THIS}::test_api_keys_create_list_revoke",
    "catalog load": f"{THIS}::test_catalog_load_records_new_wording",
    "decision-facts verify": f"{THIS}::test_decision_facts_verify_and_rebuild",
    "decision-facts rebuild": f"{THIS}::test_decision_facts_verify_and_rebuild",
    "demo": f"{THIS}::test_demo_creates_the_customer_once",
    "loyalty expire": f"{THIS}::test_loyalty_expire_takes_expired_points",
    "loyalty recompute-tiers": f"{THIS}::test_loyalty_recompute_tiers_lowers_a_lapsed_tier",
    "migrate": f"{THIS}::test_migrate_builds_a_fresh_database_once",
    "push vapid-keys": f"{THIS}::test_push_vapid_keys_made_once",
    "wallet dev-credentials": "tests.integration.test_passkit_web_service"
                              "::test_dev_credentials_command_creates_the_kit_once",
    "wallet google-sync": "tests.integration.test_wallet_google"
                          "::test_cli_google_sync_resends_every_card",
    "worker": f"{THIS}::test_worker_once_runs_every_job_and_exits",
}


def run(app: Flask, *args: str) -> click.testing.Result:
    """As `flask --app app ...` runs it: FlaskGroup pushes an app context for every command,
    the app's own ``app.cli`` only for those of its AppGroups."""
    with app.app_context():
        return app.test_cli_runner().invoke(args=list(args))


def refused(result: click.testing.Result, message: str) -> None:
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    # A refusal, not a crash: click exits with a message; no exception escapes.
    assert isinstance(result.exception, SystemExit), repr(result.exception)


# --- every command has a test ------------------------------------------------------------------


def registered(group: click.Group, prefix: str = "") -> set[str]:
    found: set[str] = set()
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found |= registered(command, f"{path} ")
        else:
            found.add(path)
    return found


def test_every_command_is_invoked_by_a_test(app):
    commands = registered(app.cli)
    assert "loyalty expire" in commands  # the walk reaches into groups
    missing = sorted(commands - COVERED.keys())
    assert not missing, f"commands no test invokes: {', '.join(missing)}; add a test and " \
                        f"name it in COVERED"
    gone = sorted(COVERED.keys() - commands)
    assert not gone, f"COVERED names commands that no longer exist: {', '.join(gone)}"
    for path, test in COVERED.items():
        module, _, function = test.partition("::")
        assert callable(getattr(importlib.import_module(module), function, None)), \
            f"{path}: {test} does not exist"


# --- api-keys ----------------------------------------------------------------------------------


def test_api_keys_create_list_revoke(app, session):
    assert run(app, "api-keys", "list").output.strip() == "no API keys"
    made = run(app, "api-keys", "create", "shop", "--scope", "decisions:read")
    assert made.exit_code == 0, made.output
    secret = made.output.strip().splitlines()[-1]
    assert "API key 'shop'" in made.output and "decisions:read" in made.output
    listed = run(app, "api-keys", "list")
    assert listed.exit_code == 0 and "shop" in listed.output and "active" in listed.output
    assert secret not in listed.output
    revoked = run(app, "api-keys", "revoke", "shop")
    assert revoked.exit_code == 0 and "revoked 'shop'" in revoked.output
    assert "revoked 20" in run(app, "api-keys", "list").output
    key = session.scalars(select(ApiKey)).one()
    assert key.name == "shop" and key.revoked_at is not None


def test_api_keys_refuse_unknown_scopes_and_keys(app, session):
    refused(run(app, "api-keys", "create", "x", "--scope", "everything"), "unknown scope")
    refused(run(app, "api-keys", "revoke", "nobody"), "nobody")
    refused(run(app, "api-keys", "create", "x"), "Missing option '--scope'")
    assert session.scalar(select(func.count()).select_from(ApiKey)) == 0


# --- catalog -----------------------------------------------------------------------------------

NEWSLETTER_WORDING = "I agree to receive the monthly newsletter on the channels I selected."


def newsletter_versions(session: Session) -> list[int]:
    session.expire_all()
    return list(session.scalars(select(TopicWording.version).where(
        TopicWording.topic_key == "newsletter").order_by(TopicWording.version)))


def test_catalog_load_records_new_wording(app, session, tmp_path):
    unchanged = run(app, "catalog", "load")
    assert unchanged.exit_code == 0, unchanged.output
    assert "added -, reworded -, withdrawn -" in unchanged.output
    before = newsletter_versions(session)
    edited = tmp_path / "catalog.toml"
    edited.write_text(CATALOG.read_text(encoding="utf-8").replace(
        NEWSLETTER_WORDING, "I agree to receive the newsletter every month."), encoding="utf-8")
    result = run(app, "catalog", "load", "--path", str(edited))
    assert result.exit_code == 0, result.output
    assert "reworded ['newsletter']" in result.output
    assert newsletter_versions(session) == [*before, before[-1] + 1]


def test_catalog_load_refuses_a_bad_file_and_writes_nothing(app, session, tmp_path):
    before = newsletter_versions(session)
    refused(run(app, "catalog", "load", "--path", str(tmp_path / "missing.toml")),
            "cannot read catalog")
    broken = tmp_path / "catalog.toml"
    broken.write_text(CATALOG.read_text(encoding="utf-8").replace(
        NEWSLETTER_WORDING, "Reworded, but the file is broken.")
        + '\n[[topics]]\nkey = "spam"\nkind = "nonsense"\n', encoding="utf-8")
    refused(run(app, "catalog", "load", "--path", str(broken)),
            "topic 'spam': 'kind' must be one of marketing, service")
    assert newsletter_versions(session) == before


# --- decision-facts ----------------------------------------------------------------------------


def test_decision_facts_verify_and_rebuild(app, session, connection):
    customer = create_customer(session, "facts@example.com", source="import")
    session.flush()
    session.add(ContactRule(customer_id=customer.id, channel="email", max_per_week=1))
    session.commit()
    assert run(app, "decision-facts", "verify").output.strip() == "every copy matches the tables"
    connection.execute(text("UPDATE customers SET decision_facts = NULL WHERE id = :c"),
                       {"c": customer.id})
    stale = run(app, "decision-facts", "verify")
    assert stale.exit_code == 1 and f"ids {customer.id}" in stale.output
    assert "decision-facts rebuild" in stale.output
    rebuilt = run(app, "decision-facts", "rebuild")
    assert rebuilt.exit_code == 0 and "rebuilt the copies of 1 customers" in rebuilt.output
    assert connection.scalar(text("SELECT decision_facts FROM customers WHERE id = :c"),
                             {"c": customer.id}) is not None
    assert run(app, "decision-facts", "verify").exit_code == 0


def test_decision_facts_refuses_unknown_arguments(app, session):
    refused(run(app, "decision-facts", "rebuild", "--all"), "No such option")
    refused(run(app, "decision-facts", "repair"), "No such command")


# --- demo --------------------------------------------------------------------------------------


def test_demo_creates_the_customer_once(app, session):
    first = run(app, "demo")
    assert first.exit_code == 0, first.output
    assert f"Demo customer: {DEMO_EMAIL}" in first.output
    assert "Password:" in first.output and "Magic link:    http://localhost/" in first.output
    again = run(app, "demo")
    assert again.exit_code == 0, again.output
    assert session.scalar(select(func.count()).select_from(Customer)) == 1
    assert find_by_email(session, DEMO_EMAIL) is not None


def test_demo_is_refused_outside_development(connection, tmp_path, session):
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, **PRODUCTION))
    refused(run(app, "demo"), "development only")
    assert session.scalar(select(func.count()).select_from(Customer)) == 0


# --- loyalty -----------------------------------------------------------------------------------


def member_earning(session: Session, points: int, months_ago: int) -> Member:
    at = add_months(utcnow(), -months_ago)
    customer = create_customer(session, f"m{months_ago}@example.com", source="import")
    member = ledger.enroll(session, PROGRAM, customer, PROGRAM.terms.version, PROOF,
                           at=at - timedelta(days=1))
    ledger.earn(session, PROGRAM, member, points, reason="Order", actor="store:test", now=at)
    session.commit()
    return member


def test_loyalty_expire_takes_expired_points(app, session):
    member = member_earning(session, 500, months_ago=25)
    assert member.balance == 500
    result = run(app, "loyalty", "expire")
    assert result.exit_code == 0, result.output
    assert "expired 500 points from 1 lots of 1 members; tiers changed: -" in result.output
    session.expire_all()
    assert member.balance == 0
    assert "expired 0 points" in run(app, "loyalty", "expire", "--batch-size", "1").output


def test_loyalty_recompute_tiers_lowers_a_lapsed_tier(app, session):
    member = member_earning(session, 1000, months_ago=13)
    assert member.tier == "silver"
    result = run(app, "loyalty", "recompute-tiers")
    assert result.exit_code == 0, result.output
    assert "1 members checked; tiers changed: {'silver->bronze': 1}" in result.output
    session.expire_all()
    assert member.tier == "bronze" and member.balance == 1000
    assert "tiers changed: -" in run(app, "loyalty", "recompute-tiers").output


@pytest.mark.parametrize("command", ["expire", "recompute-tiers"])
def test_loyalty_refuses_bad_batch_sizes(app, session, command):
    member = member_earning(session, 1000, months_ago=25)
    refused(run(app, "loyalty", command, "--batch-size", "many"), "is not a valid integer")
    refused(run(app, "loyalty", command, "--batch-size", "0"), "--batch-size")
    session.expire_all()
    assert (member.balance, member.tier) == (1000, "silver")


def test_loyalty_needs_a_programme(connection, tmp_path, session):
    plain = tmp_path / "catalog.toml"
    plain.write_text(CATALOG.read_text(encoding="utf-8").split("\n[loyalty]")[0],
                     encoding="utf-8")
    app = create_app(app_config(tmp_path, CARNET_DB_BIND=connection, CATALOG_PATH=str(plain)))
    refused(run(app, "loyalty", "expire"), "the catalog defines no [loyalty] programme")


# --- migrate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_migrate_builds_a_fresh_database_once(kind, tmp_path):
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()  # type: ignore[arg-type]
    with fresh_database(kind, tmp_path) as url:
        app = create_app(app_config(tmp_path, DATABASE_URL=url))
        engine = make_engine(url)
        try:
            refused(run(app, "migrate", "--to", "0003"), "No such option")
            assert inspect(engine).get_table_names() == []
            for _ in range(2):   # the second run finds nothing to do
                result = run(app, "migrate")
                assert result.exit_code == 0, result.output
                assert result.output.strip().endswith("database is up to date")
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head
            assert {"customers", "consent_events", "api_keys"} <= set(
                inspect(engine).get_table_names())
        finally:
            engine.dispose()


# --- push --------------------------------------------------------------------------------------


def test_push_vapid_keys_made_once(app):
    target = Path(app.instance_path) / "vapid_private.pem"
    made = run(app, "push", "vapid-keys")
    assert made.exit_code == 0, made.output
    assert f"VAPID private key written to {target}" in made.output
    public = made.output.strip().splitlines()[-1].removeprefix(
        "Public key (applicationServerKey): ")
    pem = target.read_bytes()
    assert pem.startswith(b"-----BEGIN") and len(public) > 80
    kept = run(app, "push", "vapid-keys", "--if-missing")
    assert kept.exit_code == 0 and public in kept.output
    refused(run(app, "push", "vapid-keys"), "refusing to replace a VAPID key")
    assert target.read_bytes() == pem


def test_push_vapid_keys_refuses_an_unwritable_path(app, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused(run(app, "push", "vapid-keys", "--path", str(blocker / "key.pem")),
            f"cannot write {blocker / 'key.pem'}")
    assert blocker.read_text() == "not a directory"


# --- wallet ------------------------------------------------------------------------------------


def test_wallet_commands_refuse_what_is_not_set_up(connection, tmp_path, session):
    production = create_app(app_config(tmp_path / "prod", CARNET_DB_BIND=connection,
                                       **PRODUCTION))
    refused(run(production, "wallet", "dev-credentials"), "CARNET_ENV=development only")
    assert not (Path(production.instance_path) / "wallet").exists()
    app = create_app(app_config(tmp_path / "dev", CARNET_DB_BIND=connection))
    refused(run(app, "wallet", "google-sync", "--all"), "Google Wallet is not configured")
    refused(run(app, "wallet", "google-sync", "--batch-size", "0"), "--batch-size")


# --- worker ------------------------------------------------------------------------------------


def test_worker_once_runs_every_job_and_exits(app, session):
    customer = create_customer(session, "idle@example.com", source="import")
    session.flush()
    session.add(SignInSession(customer_id=customer.id, key_hash="a" * 64, method="password",
                              last_seen_at=utcnow() - timedelta(days=8)))
    session.commit()
    result = run(app, "worker", "--once")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.strip().splitlines())
    assert lines["sessions.purge"] == "1"
    assert {"webhooks.deliver", "idempotency.purge"} <= lines.keys()
    assert session.scalar(select(func.count()).select_from(SignInSession)) == 0


def test_worker_refuses_unknown_options(app):
    refused(run(app, "worker", "--twice"), "No such option")
