"""The Alembic migrations build exactly the tables the models describe, on both databases."""

from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import core.models  # noqa: F401
from core.db import MIGRATIONS_DIR, Database


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
        if table.name == "tenant":  # its own id is the tenant id
            continue
        assert "tenant_id" in table.columns, table.name


def test_processes_starting_together_all_migrate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """API and worker start at once on a fresh database; neither may die on the race."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'race.db'}"
    code = f"from core.db import Database; Database({url!r}).migrate()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err


def _migrate_to(engine: Any, revision: str, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)


def test_0005_keeps_events_and_numbers_them_per_tenant(fresh_database_url: str) -> None:
    """Events and raw events stored under the global numbering keep their ids and nids; each
    tenant's counter continues after its own highest nid; ids become per tenant."""
    from datetime import UTC, datetime

    from core.events import queries, raw, store

    old_event = sa.table(
        "event",
        *(sa.column(c) for c in ("id", "tenant_id", "event_type", "event_source")),
        *(sa.column(c) for c in ("aggregate_type", "aggregate_id", "version")),
        sa.column("data", sa.JSON),
        sa.column("metadata", sa.JSON),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    old_raw = sa.table(
        "raw_event",
        *(sa.column(c) for c in ("id", "tenant_id", "path")),
        sa.column("headers", sa.JSON),
        sa.column("payload", sa.JSON),
        sa.column("received_at", sa.DateTime(timezone=True)),
    )
    db = Database(fresh_database_url)
    try:
        _migrate_to(db.engine, "0004")
        now = datetime.now(UTC)
        with db.engine.begin() as conn:
            for i, tenant in enumerate(["a", "b", "a", "a", "b"]):
                conn.execute(
                    old_event.insert().values(
                        id=f"e{i}",
                        tenant_id=tenant,
                        event_type="old",
                        event_source="",
                        aggregate_type="",
                        aggregate_id="",
                        version=1,
                        data={"i": i},
                        metadata={"chainloom_depth": 0},
                        created_at=now,
                    )
                )
            for i, tenant in enumerate(["b", "a", "b"]):
                conn.execute(
                    old_raw.insert().values(
                        id=f"r{i}",
                        tenant_id=tenant,
                        path="p",
                        headers={},
                        payload=i,
                        received_at=now,
                    )
                )
        before = {t: queries.events_by_type(db, t, "old", order="asc") for t in "ab"}
        assert [e["nid"] for e in before["a"]] == [1, 3, 4]
        assert [e["nid"] for e in before["b"]] == [2, 5]

        # up, down (no two tenants share an id or a nid yet) and up again
        _migrate_to(db.engine, "0005")
        _migrate_to(db.engine, "0004", down=True)
        assert queries.events_by_type(db, "a", "old", order="asc") == before["a"]
        db.migrate()
        for tenant in "ab":
            assert queries.events_by_type(db, tenant, "old", order="asc") == before[tenant]
        assert raw.get_raw_event(db, "b", 3)["id"] == "r2"
        assert raw.get_raw_event(db, "a", 2)["id"] == "r1"

        # each tenant's counter goes on after its own highest nid; a new tenant starts at 1
        assert store.append_event(db, "a", {"event_type": "new"})[0]["nid"] == 5
        assert store.append_event(db, "b", {"event_type": "new"})[0]["nid"] == 6
        assert store.append_event(db, "c", {"event_type": "new"})[0]["nid"] == 1
        assert raw.store_raw_event(db, "a", {"path": "p"})["nid"] == 3
        assert raw.store_raw_event(db, "c", {"path": "p"})["nid"] == 1
        # ids are per tenant now: b may use a's id, a may not use it twice
        assert store.append_event(db, "b", {"id": "e0", "event_type": "new"})[0]["id"] == "e0"
        with pytest.raises(store.EventError) as refused:
            store.append_event(db, "a", {"id": "e0", "event_type": "new"})
        assert refused.value.status == 409
        assert queries.latest_nid(db, "a") == 5 and queries.latest_nid(db, "b") == 7
    finally:
        db.dispose()
