"""The Alembic migrations build exactly the tables the models describe, on both databases."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import core.models  # noqa: F401
from core.db import Database


def test_migrations_match_the_models(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    db.migrate()  # a second start finds nothing to do
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    db.dispose()
    assert diff == []


def test_every_table_has_a_tenant() -> None:
    for table in SQLModel.metadata.tables.values():
        assert "tenant_id" in table.columns, table.name
