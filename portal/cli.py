"""`flask --app app ...` commands: database, catalog, demo data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from portal.core.config import ROOT
from portal.core.db import new_session

catalog_cli = AppGroup("catalog", help="The topic catalog.")
facts_cli = AppGroup("decision-facts", help="The copies of each customer's decision facts "
                     "that database triggers keep on their row.")


def init_app(app: Flask) -> None:
    app.cli.add_command(catalog_cli)
    app.cli.add_command(facts_cli)
    app.cli.add_command(migrate)
    app.cli.add_command(demo)
    from portal.loyalty.cli import loyalty_cli

    app.cli.add_command(loyalty_cli)
    from portal.push.cli import push_cli

    app.cli.add_command(push_cli)
    from portal.api.cli import api_keys_cli, worker_command

    app.cli.add_command(api_keys_cli)
    app.cli.add_command(worker_command)
    from portal.wallet_cli import wallet_cli

    app.cli.add_command(wallet_cli)


def alembic_config(url: str) -> object:
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@click.command("migrate", help="Bring the database schema up to date (Alembic).")
def migrate() -> None:
    from alembic import command

    url = current_app.config["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")  # type: ignore[arg-type]
    click.echo("database is up to date")


@catalog_cli.command("load", help="Load the catalog file; changed wording gets a new version.")
@click.option("--path", default=None, help="Catalog file (default: CARNET_CATALOG_PATH).")
def load_catalog(path: str | None) -> None:
    from portal.services.catalog import CatalogError, load_catalog_file, sync_catalog

    try:
        spec = load_catalog_file(path or current_app.config["CATALOG_PATH"])
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    session = new_session(current_app._get_current_object())  # type: ignore[attr-defined]
    with session.begin():
        report = sync_catalog(session, spec)
    click.echo(f"catalog loaded: {len(spec.topics)} topics; added {report.added or '-'}, "
               f"reworded {report.reworded or '-'}, withdrawn {report.deactivated or '-'}")


def _run_facts_sql(statement_for: Callable[[str], str]) -> Any:
    """Run the statement ``statement_for(dialect)`` of portal.models.decision_facts in a
    transaction of its own; its result, read before the commit."""
    from sqlalchemy import text

    session = new_session(current_app._get_current_object())  # type: ignore[attr-defined]
    with session.begin():
        result = session.execute(text(statement_for(session.get_bind().dialect.name)))
        return result.scalars().all() if result.returns_rows else result.rowcount  # type: ignore[attr-defined]


@facts_cli.command("verify", help="Compare every copy with the tables; exit 1 if any differs.")
def verify_facts() -> None:
    from portal.models import decision_facts

    drifted = _run_facts_sql(decision_facts.drift_statement)
    if drifted:
        shown = ", ".join(str(i) for i in drifted[:20]) + (" ..." if len(drifted) > 20 else "")
        raise click.ClickException(f"{len(drifted)} customers' copies differ from the tables "
                                   f"(ids {shown}); run: flask --app app decision-facts rebuild")
    click.echo("every copy matches the tables")


@facts_cli.command("rebuild", help="Recompute every copy from the tables (after SQL run with "
                   "the triggers disabled, or a partial restore).")
def rebuild_facts() -> None:
    from portal.models import decision_facts

    count = _run_facts_sql(decision_facts.rebuild_statement)
    click.echo(f"rebuilt the copies of {count} customers")


@click.command("demo", help="Create the demo customer (once) and print how to sign in.")
def demo() -> None:
    from portal.services.demo import ensure_demo

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if app.config["ENV"] != "development":
        # A known password and a sign-in link printed in clear have no place on a server.
        raise click.ClickException("the demo customer exists in development only")
    session = new_session(app)
    with session.begin():
        customer, password = ensure_demo(session)
    with app.test_request_context(base_url=app.config["BASE_URL"]):
        from portal.web.links import manage_link

        link = manage_link(customer)
    click.echo("")
    click.echo(f"  Demo customer: {customer.email}")
    click.echo(f"  Password:      {password}")
    click.echo(f"  Magic link:    {link}")
    click.echo("")
