"""secret bindings: provider keys bound to a URL, backends approved by an admin, audit detail

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# Keys stored before this revision are bound to their provider's public API; a vllm or ollama
# key has no public home, so it goes only to backends an admin approves from now on.
DEFAULT_BINDINGS = {
    'openai': 'https://api.openai.com/v1',
    'gemini': 'https://generativelanguage.googleapis.com/v1beta/openai',
}


def upgrade() -> None:
    with op.batch_alter_table('backend', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('approved_by', sa.String(length=64), nullable=False, server_default='')
        )
        batch_op.add_column(
            sa.Column('approved_for', sa.String(length=2100), nullable=False, server_default='')
        )
    with op.batch_alter_table('provider_config', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('base_url', sa.String(length=2000), nullable=False, server_default='')
        )
    with op.batch_alter_table('request_log', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('detail', sa.String(length=2000), nullable=False, server_default='')
        )
    provider = sa.table('provider_config', sa.column('type', sa.String), sa.column('base_url', sa.String))
    for kind, url in DEFAULT_BINDINGS.items():
        op.execute(provider.update().where(provider.c.type == kind).values(base_url=url))


def downgrade() -> None:
    with op.batch_alter_table('request_log', schema=None) as batch_op:
        batch_op.drop_column('detail')
    with op.batch_alter_table('provider_config', schema=None) as batch_op:
        batch_op.drop_column('base_url')
    with op.batch_alter_table('backend', schema=None) as batch_op:
        batch_op.drop_column('approved_for')
        batch_op.drop_column('approved_by')
