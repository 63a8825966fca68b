"""webhook deliveries record an outcome class instead of the text of the error

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:00:00

The free-text ``error`` column held ``f"{type(exc).__name__}: {exc}"``: addresses, ports and
the difference between a refused connection and a protocol error. It is dropped, and with
it every such text already stored; ``outcome`` says the same thing in a fixed vocabulary
(the API derives a fixed sentence from it). Existing rows are classed from ``ok`` and
``status_code``: a failure without a status was a connection failure of some kind.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('webhook_deliveries', sa.Column('outcome', sa.String(length=32), nullable=True))
    op.execute("UPDATE webhook_deliveries SET outcome = CASE "
               "WHEN ok THEN 'delivered' "
               "WHEN status_code IS NOT NULL THEN 'http_error' "
               "ELSE 'connection_failed' END")
    # On SQLite the batch copies the table (nothing refers to it); PostgreSQL alters in place.
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.alter_column('outcome', existing_type=sa.String(length=32), nullable=False)
        batch.drop_column('error')


def downgrade() -> None:
    op.add_column('webhook_deliveries', sa.Column('error', sa.Text(), nullable=True))
    op.execute("UPDATE webhook_deliveries SET error = CASE "
               "WHEN ok THEN NULL "
               "WHEN status_code IS NOT NULL THEN 'HTTP ' || CAST(status_code AS VARCHAR(8)) "
               "ELSE outcome END")
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.drop_column('outcome')
