"""server-side sign-in sessions (customer_sessions) and single-use link ids (used_links)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import portal.core.db

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'customer_sessions',
        sa.Column('id', BIG_ID, nullable=False),
        sa.Column('customer_id', BIG_ID, nullable=False),
        sa.Column('key_hash', sa.String(length=64), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('user_agent', sa.String(length=200), nullable=True),
        sa.Column('created_at', portal.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', portal.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['customer_id'], ['customers.id'],
                                name=op.f('fk_customer_sessions_customer_id_customers')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_customer_sessions')),
        sa.UniqueConstraint('key_hash', name=op.f('uq_customer_sessions_key_hash')),
    )
    op.create_index(op.f('ix_customer_sessions_customer_id'), 'customer_sessions',
                    ['customer_id'], unique=False)
    op.create_table(
        'used_links',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('expires_at', portal.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_used_links')),
    )
    op.create_index(op.f('ix_used_links_expires_at'), 'used_links', ['expires_at'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_used_links_expires_at'), table_name='used_links')
    op.drop_table('used_links')
    op.drop_index(op.f('ix_customer_sessions_customer_id'), table_name='customer_sessions')
    op.drop_table('customer_sessions')
