"""run status from temporal: the run table no longer copies a run's status

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 23:40:00.000000

GET /runs and GET /runs/{id} read a run's status from Temporal; the status and finished_at
columns were written only when someone read a finished run, so nothing is lost.
"""

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_column('finished_at')
        batch_op.drop_column('status')


def downgrade() -> None:
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('status', sa.String(length=32), nullable=False, server_default='running')
        )
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
