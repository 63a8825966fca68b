"""`flask --app app api-keys ...` and `flask --app app worker`."""

from __future__ import annotations

import click
from flask import current_app
from flask.cli import AppGroup

from portal.core.db import new_session
from portal.services.api_keys import SCOPES

api_keys_cli = AppGroup("api-keys", help="API keys of sending systems.")


def _app() -> object:
    return current_app._get_current_object()  # type: ignore[attr-defined]


@api_keys_cli.command("create", help="Create a key; it is printed once and never again.")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="Repeat for each scope, e.g. --scope decisions:read. Scopes: "
              + ", ".join(SCOPES) + ".")
def create(name: str, scopes: tuple[str, ...]) -> None:
    from portal.services.api_keys import ApiKeyError, create_key

    session = new_session(_app())  # type: ignore[arg-type]
    try:
        with session.begin():
            made = create_key(session, name, list(scopes))
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"API key '{made.key.name}' (id {made.key.id}), scopes: "
               f"{' '.join(made.key.scopes)}")
    click.echo("Store it now; it cannot be shown again:")
    click.echo(made.secret)


@api_keys_cli.command("list", help="Keys with their scopes, last use and status.")
def list_() -> None:
    from portal.services.api_keys import list_keys

    session = new_session(_app())  # type: ignore[arg-type]
    with session.begin():
        keys = list_keys(session)
    if not keys:
        click.echo("no API keys")
    for k in keys:
        status = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
        used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
        click.echo(f"{k.id:>4}  {k.name:<24} {k.prefix}…  {status:<24} last used {used}  "
                   f"{' '.join(k.scopes)}")


@api_keys_cli.command("revoke", help="Revoke a key by name or id; it stops working at once.")
@click.argument("name_or_id")
def revoke(name_or_id: str) -> None:
    from portal.services.api_keys import ApiKeyError, revoke_key

    session = new_session(_app())  # type: ignore[arg-type]
    try:
        with session.begin():
            key = revoke_key(session, name_or_id)
    except ApiKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked '{key.name}' (id {key.id})")


@click.command("worker", help="Run background jobs (webhook delivery and others) until "
               "stopped.")
@click.option("--once", is_flag=True, help="Run every job once and exit.")
def worker_command(once: bool) -> None:
    from portal.outbox import worker

    app = _app()
    if once:
        for name, result in worker.run_once(app).items():  # type: ignore[arg-type]
            click.echo(f"{name}: {result}")
        return
    worker.run_forever(app)  # type: ignore[arg-type]
