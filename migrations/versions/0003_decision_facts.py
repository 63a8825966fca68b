"""keep each customer's decision facts on their row (customers.decision_facts + triggers)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from portal.models import decision_facts

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('customers', sa.Column('decision_facts', sa.Text(), nullable=True))
    dialect = op.get_bind().dialect.name
    for statement in decision_facts.statements(dialect):
        op.execute(statement)
    op.execute(decision_facts.rebuild_statement(dialect))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table, trigger in decision_facts.trigger_names(dialect):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}" if dialect == "postgresql"
                   else f"DROP TRIGGER IF EXISTS {trigger}")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS carnet_refresh_decision_facts()")
        op.execute("DROP FUNCTION IF EXISTS carnet_decision_facts(bigint)")
    # Not batch_alter_table: on SQLite it rebuilds the table, and dropping the old customers
    # table fails its foreign keys. Both databases drop a column in place.
    op.execute("ALTER TABLE customers DROP COLUMN decision_facts")
