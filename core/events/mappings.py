"""Mappings (seed 003 eventstore.MappingConfig): how a raw payload on a path becomes an event."""

import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db import Database
from core.events.queries import required
from core.events.store import MAPPING_CACHE_TTL, MAX_VERSION, EventError, json_value
from core.models import EventMappingRow, utcnow

# --- mappings --------------------------------------------------------------------------------


class MappingConfig(BaseModel):
    """seed 003 eventstore.MappingConfig: how a raw payload on a path becomes an event.

    Each ``...Field`` is a JSON path into the payload ("order.id", "$.order.id",
    "items[0].sku"); when it is empty or finds nothing, the fixed value next to it is used.
    ``metadataMapping`` maps metadata keys to "header:<Name>" or a payload path.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    path: str = Field("", max_length=400)
    event_type: str = Field("", alias="eventType", max_length=200)
    event_type_field: str = Field("", alias="eventTypeField")
    event_source: str = Field("", alias="eventSource", max_length=200)
    event_source_field: str = Field("", alias="eventSourceField")
    aggregate_type: str = Field("", alias="aggregateType", max_length=200)
    aggregate_type_field: str = Field("", alias="aggregateTypeField")
    aggregate_id_field: str = Field("", alias="aggregateIDField")
    event_id_field: str = Field("", alias="eventIDField")
    version: int = Field(1, ge=0, le=MAX_VERSION)
    metadata_mapping: dict[str, str] = Field(default_factory=dict, alias="metadataMapping")

    @field_validator("metadata_mapping", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        # A ValueError, not EventError: pydantic turns only that into a 422 field error.
        try:
            return {} if value is None else json_value(value, "metadataMapping", object_only=True)
        except EventError as err:
            raise ValueError(err.message) from err

    def public(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


_PATH_TOKEN = re.compile(r"\[(\d+)\]|\[['\"]([^'\"]*)['\"]\]|\.?([^.\[\]]+)")


def extract(payload: Any, path: str) -> Any:
    """The value at a JSON path ("a.b", "$.a.b", "a[0].b", "a['x.y']"); None when missing."""
    path = path.strip()
    if path.startswith("$"):
        path = path[1:]
    value = payload
    for match in _PATH_TOKEN.finditer(path):
        index, quoted, name = match.groups()
        if index is not None:
            if not isinstance(value, list) or int(index) >= len(value):
                return None
            value = value[int(index)]
        else:
            key = quoted if quoted is not None else name
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                return None
        if value is None:
            return None
    return value


def _header(headers: dict[str, Any], name: str) -> Any:
    wanted = name.strip().lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _pick(payload: Any, field: str, fixed: str) -> str:
    if field:
        value = extract(payload, field)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    return fixed


def apply_mapping(
    config: MappingConfig, payload: Any, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The event a mapping makes of a raw payload (not yet validated or stored)."""
    headers = headers or {}
    event_type = _pick(payload, config.event_type_field, config.event_type)
    if not event_type:
        raise EventError(
            422,
            "mapping_no_event_type",
            f"the mapping for path {config.path!r} gives no event_type for this payload "
            f"(eventTypeField {config.event_type_field!r} found nothing and eventType is empty)",
        )
    metadata: dict[str, Any] = {}
    for key, source in config.metadata_mapping.items():
        if source.lower().startswith("header:"):
            value = _header(headers, source.split(":", 1)[1])
        elif source.lower().startswith("headers."):
            value = _header(headers, source.split(".", 1)[1])
        else:
            value = extract(payload, source.removeprefix("payload:"))
        if value is not None:
            metadata[key] = value
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_source": _pick(payload, config.event_source_field, config.event_source),
        "aggregate_type": _pick(payload, config.aggregate_type_field, config.aggregate_type),
        "aggregate_id": _pick(payload, config.aggregate_id_field, ""),
        "version": config.version,
        "data": payload if payload is not None else {},
        "metadata": metadata,
    }
    event_id = _pick(payload, config.event_id_field, "")
    if event_id:
        event["id"] = event_id
    return event


class _MappingCache:
    """Mappings by (database, tenant, path), refreshed after MAPPING_CACHE_TTL or on /sync."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], tuple[float, MappingConfig | None]] = {}

    def get(self, db: Database, tenant_id: str, path: str) -> MappingConfig | None:
        key = (db.url, tenant_id, path)
        hit = self._entries.get(key)
        if hit is not None and time.monotonic() - hit[0] < MAPPING_CACHE_TTL:
            return hit[1]
        config = load_mapping(db, tenant_id, path)
        self._entries[key] = (time.monotonic(), config)
        return config

    def forget(self, db: Database, tenant_id: str, path: str | None = None) -> None:
        for key in list(self._entries):
            if key[0] == db.url and key[1] == tenant_id and (path is None or key[2] == path):
                self._entries.pop(key, None)

    def fill(self, db: Database, tenant_id: str, configs: list[MappingConfig]) -> None:
        self.forget(db, tenant_id)
        now = time.monotonic()
        for config in configs:
            self._entries[(db.url, tenant_id, config.path)] = (now, config)


MAPPINGS = _MappingCache()


def load_mapping(db: Database, tenant_id: str, path: str) -> MappingConfig | None:
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, path))
    return MappingConfig.model_validate({**row.config, "path": path}) if row else None


def list_mappings(db: Database, tenant_id: str) -> list[MappingConfig]:
    query = (
        select(EventMappingRow)
        .where(EventMappingRow.tenant_id == tenant_id)
        .order_by(col(EventMappingRow.path))
    )
    with db.session() as session:
        rows = session.exec(query).all()
    return [MappingConfig.model_validate({**row.config, "path": row.path}) for row in rows]


def get_mapping(db: Database, tenant_id: str, path: str | None) -> MappingConfig:
    config = load_mapping(db, tenant_id, required(path, "path"))
    if config is None:
        raise EventError(404, "not_found", f"mapping for path {path!r} not found")
    return config


def _check_mapping(config: MappingConfig) -> None:
    if not config.path:
        raise EventError(422, "invalid_mapping", "path is required", param="path")
    if not config.event_type and not config.event_type_field:
        raise EventError(
            422,
            "invalid_mapping",
            "a mapping needs eventType (a fixed type) or eventTypeField (a JSON path)",
            param="eventType",
        )


def create_mapping(db: Database, tenant_id: str, config: MappingConfig) -> MappingConfig:
    _check_mapping(config)
    row = EventMappingRow(tenant_id=tenant_id, path=config.path, config=config.public())
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise EventError(
                409, "already_exists", f"a mapping for path {config.path!r} exists", param="path"
            ) from err
    MAPPINGS.forget(db, tenant_id, config.path)
    return config


def update_mapping(
    db: Database, tenant_id: str, path: str | None, config: MappingConfig
) -> MappingConfig:
    # seed 003: the path from the query parameter overrides any path in the body.
    config = config.model_copy(update={"path": required(path, "path")})
    _check_mapping(config)
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, config.path))
        if row is None:
            raise EventError(404, "not_found", f"mapping for path {config.path!r} not found")
        row.config = config.public()
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    MAPPINGS.forget(db, tenant_id, config.path)
    return config


def delete_mapping(db: Database, tenant_id: str, path: str | None) -> None:
    wanted = required(path, "path")
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, wanted))
        if row is None:
            raise EventError(404, "not_found", f"mapping for path {wanted!r} not found")
        session.delete(row)
        session.commit()
    MAPPINGS.forget(db, tenant_id, wanted)


def sync_mappings(db: Database, tenant_id: str) -> int:
    """POST /sync: reload this process's mapping cache from the database."""
    configs = list_mappings(db, tenant_id)
    MAPPINGS.fill(db, tenant_id, configs)
    return len(configs)
