"""`flask --app app loyalty ...`: the nightly expiry and the tier recomputation.

Both commit after every batch of members, so row locks are held briefly while accruals go on,
and both are safe to run again: a second run finds nothing left to do.
"""

from __future__ import annotations

import time

import click
from flask import current_app
from flask.cli import AppGroup

from portal.core.db import new_session
from portal.loyalty.program import LoyaltyProgram

loyalty_cli = AppGroup("loyalty", help="The loyalty programme's ledger jobs.")


def _program() -> LoyaltyProgram:
    from portal.loyalty.views import current_program

    program = current_program(current_app._get_current_object())  # type: ignore[attr-defined]
    if program is None:
        raise click.ClickException("the catalog defines no [loyalty] programme")
    return program


@loyalty_cli.command("expire", help="Expire points past their expiry date, oldest lots first.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Members per transaction.")
def expire(batch_size: int) -> None:
    from portal.loyalty.jobs import ExpiryReport, TierReport, expire_batches, tier_batches

    program = _program()
    session = new_session(current_app._get_current_object())  # type: ignore[attr-defined]
    started = time.perf_counter()
    report, tiers = ExpiryReport(), TierReport()
    try:
        for batch in expire_batches(session, batch_size=batch_size):
            session.commit()
            report.add(batch)
        for tier_batch in tier_batches(session, program, batch_size=batch_size):
            session.commit()
            tiers.add(tier_batch)
        session.commit()
    finally:
        session.close()
    click.echo(f"expired {report.points} points from {report.lots} lots of {report.members} "
               f"members; tiers changed: {tiers.changed or '-'} "
               f"({time.perf_counter() - started:.1f} s)")


@loyalty_cli.command("recompute-tiers", help="Recompute every member's tier from the window.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Members per transaction.")
def recompute_tiers(batch_size: int) -> None:
    from portal.loyalty.jobs import TierReport, tier_batches

    program = _program()
    session = new_session(current_app._get_current_object())  # type: ignore[attr-defined]
    tiers = TierReport()
    try:
        for batch in tier_batches(session, program, batch_size=batch_size):
            session.commit()
            tiers.add(batch)
        session.commit()
    finally:
        session.close()
    click.echo(f"{tiers.members} members checked; tiers changed: {tiers.changed or '-'}")
