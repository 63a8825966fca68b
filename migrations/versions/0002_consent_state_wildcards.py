"""index the channel switches and marketing pauses (consent states of topic "*")

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 03:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('consent_states', schema=None) as batch_op:
        batch_op.create_index('ix_consent_states_wildcards', ['channel', 'customer_id'],
                              unique=False, postgresql_where=sa.text("topic_key = '*'"),
                              sqlite_where=sa.text("topic_key = '*'"))


def downgrade() -> None:
    with op.batch_alter_table('consent_states', schema=None) as batch_op:
        batch_op.drop_index('ix_consent_states_wildcards',
                            postgresql_where=sa.text("topic_key = '*'"),
                            sqlite_where=sa.text("topic_key = '*'"))
