"""event ids and nids per tenant, trigger outbox

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 23:40:00

Events and raw events were numbered by one global sequence and their ids were unique across
all tenants. Now (tenant_id, nid) is the primary key, (tenant_id, id) is unique, and each
tenant's next nid comes from its own counter row in event_sequence.

Existing rows keep their nids: a stream client resuming with Last-Event-ID, and metadata that
names a raw_event_nid, stay correct. Each tenant's counter starts after its highest nid, so
new nids never collide with old ones (old nids still show the gaps they had; new ones do not).

On PostgreSQL the constraints are swapped in place; SQLite cannot alter a primary key, so its
tables are copied into the new shape.

The downgrade restores global numbering only when no two tenants share an id or a nid;
otherwise the old unique constraints cannot be built and it stops with the database's error.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def _event_columns() -> list[sa.Column]:
    return [
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("nid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("event_source", sa.String(length=200), nullable=False),
        sa.Column("aggregate_type", sa.String(length=200), nullable=False),
        sa.Column("aggregate_id", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
    ]


def _raw_event_columns() -> list[sa.Column]:
    return [
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("nid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=400), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("received_at", _TZ, nullable=False),
    ]


_EVENT_INDEXES = {
    "ix_event_aggregate_time": ["tenant_id", "aggregate_type", "aggregate_id", "created_at"],
    "ix_event_source_time": ["tenant_id", "event_source", "created_at"],
    "ix_event_time": ["tenant_id", "created_at"],
    "ix_event_type_time": ["tenant_id", "event_type", "created_at"],
}
_RAW_INDEXES = {"ix_raw_event_time": ["tenant_id", "received_at"]}


def _copy_sqlite(table: str, columns: list[sa.Column], indexes: dict[str, list[str]]) -> None:
    """SQLite: build the table anew with the per-tenant keys and copy every row across."""
    names = ", ".join(f'"{c.name}"' for c in columns)
    new = f"_{table}_0005"
    op.create_table(
        new,
        *columns,
        sa.PrimaryKeyConstraint("tenant_id", "nid"),
        sa.UniqueConstraint("tenant_id", "id", name=f"uq_{table}_tenant_id"),
    )
    op.execute(f"INSERT INTO {new} ({names}) SELECT {names} FROM {table}")
    op.drop_table(table)
    op.rename_table(new, table)
    for name, cols in indexes.items():
        op.create_index(name, table, cols)


def _alter_postgresql(table: str) -> None:
    """PostgreSQL: swap the keys in place (the rows and their other indexes stay)."""
    op.drop_constraint(f"{table}_id_key", table, type_="unique")
    op.drop_constraint(f"{table}_pkey", table, type_="primary")
    op.execute(f"ALTER TABLE {table} ALTER COLUMN nid DROP DEFAULT")
    op.execute(f"DROP SEQUENCE IF EXISTS {table}_nid_seq")
    op.create_primary_key(f"{table}_pkey", table, ["tenant_id", "nid"])
    op.create_unique_constraint(f"uq_{table}_tenant_id", table, ["tenant_id", "id"])


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _copy_sqlite("event", _event_columns(), _EVENT_INDEXES)
        _copy_sqlite("raw_event", _raw_event_columns(), _RAW_INDEXES)
    else:
        _alter_postgresql("event")
        _alter_postgresql("raw_event")

    op.create_table(
        "event_sequence",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_nid", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name"),
    )
    for table in ("event", "raw_event"):
        op.execute(
            f"INSERT INTO event_sequence (tenant_id, name, last_nid) "
            f"SELECT tenant_id, '{table}', MAX(nid) FROM {table} GROUP BY tenant_id"
        )

    op.create_table(
        "trigger_outbox",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("event_nid", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("trigger_name", sa.String(length=200), nullable=False),
        sa.Column("function_name", sa.String(length=200), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", _TZ, nullable=False),
        sa.Column("last_error", sa.String(length=2000), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "event_nid", "trigger_name"),
    )
    op.create_index("ix_trigger_outbox_due", "trigger_outbox", ["due_at"])


def _restore_sqlite(table: str, columns: list[sa.Column], indexes: dict[str, list[str]]) -> None:
    names = ", ".join(f'"{c.name}"' for c in columns)
    old = f"_{table}_0004"
    nid = next(c for c in columns if c.name == "nid")
    nid.type = sa.Integer()
    op.create_table(old, *columns, sa.PrimaryKeyConstraint("nid"), sa.UniqueConstraint("id"))
    op.execute(f"INSERT INTO {old} ({names}) SELECT {names} FROM {table}")
    op.drop_table(table)
    op.rename_table(old, table)
    for name, cols in indexes.items():
        op.create_index(name, table, cols)


def downgrade() -> None:
    op.drop_index("ix_trigger_outbox_due", table_name="trigger_outbox")
    op.drop_table("trigger_outbox")
    op.drop_table("event_sequence")
    if op.get_bind().dialect.name == "sqlite":
        _restore_sqlite("event", _event_columns(), _EVENT_INDEXES)
        _restore_sqlite("raw_event", _raw_event_columns(), _RAW_INDEXES)
        return
    for table in ("event", "raw_event"):
        op.drop_constraint(f"uq_{table}_tenant_id", table, type_="unique")
        op.drop_constraint(f"{table}_pkey", table, type_="primary")
        op.create_primary_key(f"{table}_pkey", table, ["nid"])
        op.create_unique_constraint(f"{table}_id_key", table, ["id"])
        op.execute(f"CREATE SEQUENCE {table}_nid_seq OWNED BY {table}.nid")
        op.execute(
            f"SELECT setval('{table}_nid_seq', COALESCE((SELECT MAX(nid) FROM {table}), 0) + 1, "
            "false)"
        )
        op.execute(
            f"ALTER TABLE {table} ALTER COLUMN nid SET DEFAULT nextval('{table}_nid_seq')"
        )
