"""`flask --app app wallet ...`: wallet card commands."""

from __future__ import annotations

from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

wallet_cli = AppGroup("wallet", help="Apple and Google Wallet cards.")

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"


@wallet_cli.command("dev-credentials",
                    help="Create (once) local signing and push credentials for development.")
def dev_credentials() -> None:
    """Never replaces existing files: cards already issued must keep verifying."""
    from passes.devcerts import DevCredentialsError, create_dev_apple_credentials
    from passes.google_dev import create_dev_service_account
    from portal.wallet_ws.issuer import apple_wallet, dev_directory

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    wallet = apple_wallet(app)
    if not wallet.development:
        raise click.ClickException("development credentials are for CARNET_ENV=development "
                                   "only; configure the real Apple and Google credentials")
    assert wallet.team_id is not None
    try:
        paths = create_dev_apple_credentials(dev_directory(app), wallet.pass_type_id,
                                             wallet.team_id)
    except DevCredentialsError as exc:
        raise click.ClickException(str(exc)) from exc
    google = create_dev_service_account(
        Path(app.instance_path) / "wallet" / "google" / "service-account.json",
        token_uri=str(app.config.get("GOOGLE_TOKEN_URI") or GOOGLE_TOKEN_URI))
    click.echo(f"Apple pass type {wallet.pass_type_id}, team {wallet.team_id}:")
    for name in ("certificate", "private_key", "wwdr", "ca_bundle", "apns_key"):
        click.echo(f"  {name:<12} {paths[name]}")
    click.echo(f"Google service account: {google}")


@wallet_cli.command("google-sync",
                    help="Push changed points and tiers to Google Wallet cards now.")
@click.option("--all", "mark_all", is_flag=True,
              help="Send every issued card again (after a change of card design).")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1),
              help="Cards per round.")
def google_sync(mark_all: bool, batch_size: int) -> None:
    """What the worker does every few seconds, in rounds until nothing is due."""
    from portal.wallet_sync import close_google_client, sync_google_cards

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        report = sync_google_cards(app, mark_all=mark_all, limit=batch_size)
        if isinstance(report, str):
            raise click.ClickException(report)
        total = report
        while report.claimed == batch_size:
            report = sync_google_cards(app, limit=batch_size)
            assert not isinstance(report, str)
            for name in ("claimed", "updated", "created", "notified", "unchanged",
                         "retrying", "failed"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            total.errors.extend(report.errors)
    finally:
        close_google_client(app)
    click.echo(str(total))
    for error in total.errors[:20]:
        click.echo(f"  {error}", err=True)
