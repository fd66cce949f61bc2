"""Database tables. Every table carries tenant_id so tenancy never needs a rewrite."""

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    Text,
    UniqueConstraint,
)
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
    # Who (user, key or "bootstrap", with manage on backends) last created or re-pointed the
    # backend, and the "<type> <baseUrl>" they approved: the backend receives its type's
    # provider key only at that target, or at the key's bound URL (docs/backends.md).
    approved_by: str = Field(default="", max_length=64)
    approved_for: str = Field(default="", max_length=2100)
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
    # No status here: a run's status is read from Temporal (GET /runs, GET /runs/{id}).
    created_at: datetime = _ts()


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
    # The URL the key is bound to: backends with this baseUrl receive it, others only when
    # an admin approved them ("" binds it to no URL).
    base_url: str = Field(default="", max_length=2000)
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


class RemoteHookRow(SQLModel, table=True):
    """A remote service whose OpenAPI operations become tools (seed 003 RemoteHook)."""

    __tablename__ = "remote_hook"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_hook_tenant_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    name: str = Field(max_length=200)
    endpoint_url: str = Field(max_length=2000)
    timeout_ms: int = 10_000
    # Header values are secrets (tokens): stored encrypted as one JSON object.
    headers_encrypted: str = Field(default="", max_length=20_000)
    # Injected arguments [{in, name, value}], hidden from the model and added at call time.
    properties: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class FunctionRow(SQLModel, table=True):
    """A stored JavaScript function (seed 003 functionstore.Function)."""

    __tablename__ = "function"

    tenant_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=200)
    description: str = ""
    script_type: str = Field(default="goja", max_length=32)
    script: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class EventTriggerRow(SQLModel, table=True):
    """Runs a function when an event of a type is appended (seed 003 EventTrigger)."""

    __tablename__ = "event_trigger"
    __table_args__ = (
        Index("ix_trigger_tenant_type", "tenant_id", "listen_for_type"),
        Index("ix_trigger_tenant_function", "tenant_id", "function_name"),
    )

    tenant_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=200)
    description: str = ""
    listen_for_type: str = Field(max_length=200)
    type: str = Field(default="function", max_length=32)
    function_name: str = Field(max_length=200)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class EventRow(SQLModel, table=True):
    """The event store (seed 003 eventstore.Event); indexes serve each query route.

    Ids and nids belong to the tenant: two tenants may use the same event id, and a tenant's
    nids are numbered by its own counter (EventSequenceRow), so they say nothing about other
    tenants' traffic.
    """

    __tablename__ = "event"
    __table_args__ = (
        UniqueConstraint("tenant_id", "id", name="uq_event_tenant_id"),
        Index("ix_event_type_time", "tenant_id", "event_type", "created_at"),
        Index("ix_event_source_time", "tenant_id", "event_source", "created_at"),
        Index(
            "ix_event_aggregate_time", "tenant_id", "aggregate_type", "aggregate_id", "created_at"
        ),
        Index("ix_event_time", "tenant_id", "created_at"),
    )

    tenant_id: str = Field(primary_key=True, max_length=64)
    nid: int | None = Field(
        default=None, sa_column=Column(BigInteger, primary_key=True, autoincrement=False)
    )
    id: str = Field(default_factory=new_id, max_length=64)
    event_type: str = Field(max_length=200)
    event_source: str = Field(default="", max_length=200)
    aggregate_type: str = Field(default="", max_length=200)
    aggregate_id: str = Field(default="", max_length=200)
    version: int = 1
    data: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    metadata_: Any = Field(default=None, sa_column=Column("metadata", JSON, nullable=True))
    created_at: datetime = _ts()


class RawEventRow(SQLModel, table=True):
    """Raw payloads received on /ingest before mapping (seed 003 eventstore.RawEvent); ids and
    nids per tenant, as for events."""

    __tablename__ = "raw_event"
    __table_args__ = (
        UniqueConstraint("tenant_id", "id", name="uq_raw_event_tenant_id"),
        Index("ix_raw_event_time", "tenant_id", "received_at"),
    )

    tenant_id: str = Field(primary_key=True, max_length=64)
    nid: int | None = Field(
        default=None, sa_column=Column(BigInteger, primary_key=True, autoincrement=False)
    )
    id: str = Field(default_factory=new_id, max_length=64)
    path: str = Field(max_length=400)
    headers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    payload: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    received_at: datetime = _ts()


class EventSequenceRow(SQLModel, table=True):
    """The last nid a tenant was given, per numbered table ("event", "raw_event").

    Appending bumps the counter row and holds its lock until the commit, so a tenant's appends
    take turns and its nid order is commit order (what /events/stream resumes by). A nid is
    never given twice, even after its event was deleted.
    """

    __tablename__ = "event_sequence"

    tenant_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=32)
    last_nid: int = Field(sa_column=Column(BigInteger, nullable=False))


class TriggerOutboxRow(SQLModel, table=True):
    """A trigger workflow start an appended event owes, written in the append's transaction
    and removed once Temporal has the workflow (docs/events.md, "The trigger outbox")."""

    __tablename__ = "trigger_outbox"
    __table_args__ = (Index("ix_trigger_outbox_due", "due_at"),)

    tenant_id: str = Field(primary_key=True, max_length=64)
    event_nid: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    trigger_name: str = Field(primary_key=True, max_length=200)
    function_name: str = Field(max_length=200)
    depth: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    # Failed starts so far; the entry is retried with backoff until one succeeds.
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    # When a sweeper may (next) try it. An entry being started is leased: due_at lies a
    # START lease ahead, so only a dead or stuck process's entries come due again.
    due_at: datetime = _ts()
    last_error: str = Field(default="", max_length=2000)
    created_at: datetime = _ts()


class EventMappingRow(SQLModel, table=True):
    """How raw payloads on a path become events (seed 003 eventstore.MappingConfig)."""

    __tablename__ = "event_mapping"

    tenant_id: str = Field(primary_key=True, max_length=64)
    path: str = Field(primary_key=True, max_length=400)
    config: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


# Identity and tenancy (docs/identity.md).


class TenantRow(SQLModel, table=True):
    """A tenant owns every other row; seed 002 calls it a project."""

    __tablename__ = "tenant"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    # Per-tenant overrides of the CHAINLOOM_* defaults; None means the default applies.
    request_quota: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    token_quota: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    rate_limit: str | None = Field(default=None, max_length=100)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class UserRow(SQLModel, table=True):
    __tablename__ = "app_user"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    # The tenant made at /register; a user may be a member of others (MembershipRow).
    tenant_id: str = Field(index=True, max_length=64)
    email: str = Field(max_length=320, unique=True)
    friendly_name: str = Field(default="", max_length=200)
    subject: str = Field(default_factory=new_id, max_length=64, unique=True)
    password_hash: str = Field(max_length=400)
    # Bumped on delete and password change: every JWT carrying an older value stops working.
    token_version: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    # Set only by another system administrator (POST /system/admins), never by the user.
    system_admin: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class RevokedTokenRow(SQLModel, table=True):
    """JWT ids refused before they expire: used refresh tokens and logged-out sessions."""

    __tablename__ = "revoked_token"

    jti: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=64)
    user_id: str = Field(max_length=64)
    # "refreshed" (spent by /token_refresh: presenting it again may mean it was stolen) or
    # "logout".
    reason: str = Field(max_length=16)
    expires_at: datetime = Field(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True)
    )


class MembershipRow(SQLModel, table=True):
    __tablename__ = "membership"

    tenant_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(primary_key=True, max_length=64, index=True)
    role: str = Field(max_length=16)  # admin | member | viewer
    created_at: datetime = _ts()


class ApiKeyRow(SQLModel, table=True):
    """Only a SHA-256 of the key is kept; the key itself is shown once, at creation."""

    __tablename__ = "api_key"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    user_id: str | None = Field(default=None, max_length=64)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=32, unique=True)
    key_hash: str = Field(max_length=128)
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()
    expires_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    last_used_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class AccessEntryRow(SQLModel, table=True):
    """Grants an identity (user or API key id) a permission level on a resource (seed 003)."""

    __tablename__ = "access_entry"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "identity", "resource_type", "resource", name="uq_access_entry"
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    identity: str = Field(max_length=64)
    resource_type: str = Field(max_length=64)
    resource: str = Field(max_length=400)  # an id, or "*" for every resource of the type
    permission: str = Field(max_length=16)  # none | view | edit | manage
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class RequestLogRow(SQLModel, table=True):
    """One API request: /activity reads it, and its changes are the audit log."""

    __tablename__ = "request_log"
    __table_args__ = (
        Index("ix_request_log_time", "tenant_id", "at"),
        Index("ix_request_log_op", "tenant_id", "operation", "subject", "at"),
        Index("ix_request_log_at", "at"),  # retention deletes across tenants
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=64)
    at: datetime = _ts()
    method: str = Field(max_length=10)
    path: str = Field(max_length=2000)
    route: str = Field(default="", max_length=400)
    status: int = Field(sa_column=Column(Integer, nullable=False))
    duration_ms: float = 0.0
    identity: str = Field(default="", max_length=64)
    identity_kind: str = Field(default="", max_length=16)
    operation: str = Field(default="", max_length=32)  # create | update | delete | read | ...
    subject: str = Field(default="", max_length=64)  # the resource type
    subject_id: str = Field(default="", max_length=400)
    run_id: str | None = Field(default=None, max_length=64)
    client: str = Field(default="", max_length=64)
    # What a change did to secrets and where they go (a backend approved, a hook's secret
    # headers dropped, a provider key bound), noted by the route that made it.
    detail: str = Field(default="", max_length=2000)


class UsageRow(SQLModel, table=True):
    """Requests and model tokens a tenant used in a calendar month (UTC)."""

    __tablename__ = "usage"

    tenant_id: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=7)  # YYYY-MM
    requests: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime = _ts()


class RunRecordRow(SQLModel, table=True):
    """A chain run's finished state units and its values too large for Temporal history
    (docs/chains.md, "Long and large chains"). A value too large for one store call is kept
    as parts of its JSON text."""

    __tablename__ = "run_record"

    workflow_id: str = Field(primary_key=True, max_length=400)
    kind: str = Field(primary_key=True, max_length=16)  # unit | value
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    part: int = Field(default=0, primary_key=True, sa_column_kwargs={"autoincrement": False})
    tenant_id: str = Field(max_length=64, index=True)
    data: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ts()
