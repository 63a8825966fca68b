"""STOP replies recorded before 0007 kept the sender's number in the ledger's ``actor``

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 18:30:00

``consent_events`` is append-only, so erasure could never remove a phone number written as
``actor = 'sms:+33…'``. New replies write ``actor = 'sms-reply'`` and the number in the
proof's erasable part (``consent_proofs.user_agent = 'SMS from …'``). This migration gives
the rows written before the same shape: the number moves to the proof (or goes, for a
customer already erased), the actor becomes ``sms-reply``. It is the one place where the
ledger is rewritten, with its guard lifted for the length of one statement.
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

OLD = "actor LIKE 'sms:%'"


def upgrade() -> None:
    bind = op.get_bind()
    op.execute(
        "UPDATE consent_proofs SET user_agent = 'SMS from ' || ("
        "  SELECT substr(e.actor, 5) FROM consent_events e WHERE e.id = consent_proofs.event_id)"
        " WHERE user_agent IS NULL AND event_id IN ("
        "  SELECT e.id FROM consent_events e JOIN customers c ON c.id = e.customer_id"
        f"  WHERE e.{OLD} AND c.erased_at IS NULL)")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE consent_events DISABLE TRIGGER consent_events_append_only")
        op.execute(f"UPDATE consent_events SET actor = 'sms-reply' WHERE {OLD}")
        op.execute("ALTER TABLE consent_events ENABLE TRIGGER consent_events_append_only")
    else:
        op.execute("DROP TRIGGER consent_events_no_update")
        op.execute(f"UPDATE consent_events SET actor = 'sms-reply' WHERE {OLD}")
        op.execute("CREATE TRIGGER consent_events_no_update BEFORE UPDATE ON consent_events "
                   "BEGIN SELECT RAISE(ABORT, 'consent_events is append-only'); END")


def downgrade() -> None:
    """Nothing to undo: the numbers are where the code of every version can read them."""
