"""Database tables. Every table carries tenant_id so tenancy never needs a rewrite."""

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def rfc3339(value: datetime) -> str:
    return as_utc(value).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


def _ts() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class TaskChainRow(SQLModel, table=True):
    __tablename__ = "taskchain"

    tenant_id: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=200)
    description: str = ""
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class BackendRow(SQLModel, table=True):
    __tablename__ = "backend"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_backend_tenant_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    name: str = Field(max_length=200)
    base_url: str = Field(max_length=2000)
    type: str = Field(max_length=32)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class ModelRow(SQLModel, table=True):
    __tablename__ = "model"
    __table_args__ = (UniqueConstraint("tenant_id", "model", name="uq_model_tenant_model"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    model: str = Field(max_length=400)
    can_chat: bool = True
    can_embed: bool = False
    can_prompt: bool = True
    can_stream: bool = True
    context_length: int = 0
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class RunRow(SQLModel, table=True):
    __tablename__ = "run"
    __table_args__ = (Index("ix_run_tenant_created", "tenant_id", "created_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=64)
    workflow_id: str = Field(max_length=400, unique=True)
    chain_id: str = Field(max_length=200, index=True)
    # Last status seen; Temporal is the source of truth while a run is open.
    status: str = Field(default="running", max_length=32)
    created_at: datetime = _ts()
    finished_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class AffinityGroupRow(SQLModel, table=True):
    __tablename__ = "affinity_group"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_group_tenant_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    name: str = Field(max_length=200)
    purpose_type: str = Field(default="", max_length=200, index=True)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class GroupBackendRow(SQLModel, table=True):
    """A backend's membership in an affinity group."""

    __tablename__ = "group_backend"

    group_id: str = Field(primary_key=True, max_length=64)
    backend_id: str = Field(primary_key=True, max_length=64, index=True)
    tenant_id: str = Field(max_length=64, index=True)
    created_at: datetime = _ts()


class GroupModelRow(SQLModel, table=True):
    """A model's membership in an affinity group."""

    __tablename__ = "group_model"

    group_id: str = Field(primary_key=True, max_length=64)
    model_id: str = Field(primary_key=True, max_length=64, index=True)
    tenant_id: str = Field(max_length=64, index=True)
    created_at: datetime = _ts()


class ProviderConfigRow(SQLModel, table=True):
    """A hosted provider's API key (OpenAI, Gemini, ...), encrypted at rest."""

    __tablename__ = "provider_config"

    tenant_id: str = Field(primary_key=True, max_length=64)
    type: str = Field(primary_key=True, max_length=32)
    api_key_encrypted: str = Field(max_length=4000)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class BackendStateRow(SQLModel, table=True):
    """What chainloom last saw of a backend: health (for routing) and its model list."""

    __tablename__ = "backend_state"

    backend_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=64, index=True)
    healthy: bool = True
    failures: int = 0
    last_error: str = ""
    down_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    pulled_models: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    checked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
