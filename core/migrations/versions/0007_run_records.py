"""run records: a chain run's stored state units and large values

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('run_record',
    sa.Column('workflow_id', sa.String(length=400), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('part', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('workflow_id', 'kind', 'seq', 'part')
    )
    with op.batch_alter_table('run_record', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_run_record_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('run_record', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_run_record_tenant_id'))
    op.drop_table('run_record')
