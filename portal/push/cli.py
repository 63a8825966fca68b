"""`flask --app app push ...`: the VAPID key pair, made once.

Every browser subscription is bound to the public key it was made with, so the key is
generated explicitly, once, and an existing key is never replaced.
"""

from __future__ import annotations

from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

push_cli = AppGroup("push", help="Web push (browser notifications).")


@push_cli.command("vapid-keys", help="Generate the VAPID key pair once and print the public "
                  "key. Refuses to replace an existing key.")
@click.option("--path", default=None, help="Where to write the private key (PEM); default "
              "CARNET_VAPID_PRIVATE_KEY, else instance/vapid_private.pem.")
@click.option("--if-missing", is_flag=True, help="Succeed without doing anything when the "
              "key already exists (used by `make run`).")
def vapid_keys(path: str | None, if_missing: bool) -> None:
    from portal.push.webpush import (
        VapidKeyError,
        generate_vapid_keys,
        load_vapid_private_key,
        save_vapid_private_key,
    )

    configured = current_app.config.get("VAPID_PRIVATE_KEY") or ""
    if path is None and "-----BEGIN" in configured:
        if if_missing:
            return
        raise click.ClickException("CARNET_VAPID_PRIVATE_KEY holds a key already; refusing to "
                                   "make another one.")
    target = Path(path or configured or Path(current_app.instance_path) / "vapid_private.pem")
    if target.exists():
        if if_missing:
            click.echo(f"VAPID key: {target} (public key "
                       f"{load_vapid_private_key(target).public_key})")
            return
        raise click.ClickException(f"{target} already exists; refusing to replace a VAPID "
                                   "key that existing subscriptions depend on.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_vapid_private_key(generate_vapid_keys(), target)
    except VapidKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {target}: {exc.strerror or exc}") from exc
    keys = load_vapid_private_key(target)
    click.echo(f"VAPID private key written to {target} (keep it secret, back it up).")
    click.echo(f"Public key (applicationServerKey): {keys.public_key}")
