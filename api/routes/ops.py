"""Operations: liveness, readiness and ping (no auth), and /system for system administrators.

/health answers from the process alone, so an orchestrator never restarts the API because a
dependency is down; /ready is what says whether the dependencies answer.
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import psutil
from fastapi import Request, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import text
from sqlmodel import col, func, select
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from api.deps import AppState, StateDep
from api.errors import APIError, not_found
from api.fields import plain_text
from api.schemas import Camel, Timestamp, absent_when_none
from api.strict_json import json_router
from core.models import UserRow, utcnow

public_router = json_router(tags=["operations"])
log = logging.getLogger(__name__)
router = json_router(tags=["operations"])

_MB = 1024 * 1024


class Health(Camel):
    status: Literal["ok"] = "ok"
    version: str
    uptime_seconds: float
    memory_mb: float = Field(alias="memoryMB", description="Resident memory of the process.")


class Pong(Camel):
    msg: Literal["pong"] = "pong"


class Check(Camel):
    """One dependency's probe: `error` when it failed, `skipped` when it is not configured."""

    ok: bool
    error: str | None = absent_when_none()
    skipped: bool | None = absent_when_none()
    latency_ms: float | None = absent_when_none()


class ReadyChecks(Camel):
    database: Check
    temporal: Check
    qdrant: Check
    redis: Check


class Readiness(Camel):
    status: Literal["ready", "not_ready"]
    checks: ReadyChecks
    total_latency_ms: float


def _uptime(state: AppState) -> float:
    return round(time.time() - state.started, 3)


@public_router.get("/health", summary="Liveness: the process answers (checks no dependency).")
async def health(request: Request) -> Health:
    state: AppState = request.app.state.chainloom
    return Health(
        version=request.app.version,
        uptime_seconds=_uptime(state),
        memory_mb=round(psutil.Process().memory_info().rss / _MB, 1),
    )


@public_router.get("/ping", summary="Answers pong.")
async def ping() -> Pong:
    return Pong()


async def _check(probe: Callable[[], Awaitable[Any]], limit: float, detailed: bool = True) -> Check:
    """Runs one probe within `limit` seconds: whether it answered, how fast, and why not.

    `detailed=False` (the public /ready) names only the kind of failure: driver messages
    carry hosts, ports and user names that anonymous callers should not read. The full
    message goes to the log and to /system/services.
    """
    started = time.perf_counter()
    result = Check(ok=True)
    try:
        await asyncio.wait_for(probe(), limit)
    except TimeoutError:
        result = Check(ok=False, error=f"no answer within {limit:g} s")
    except Exception as err:
        log.warning("readiness probe failed: %s", _describe(err))
        result = Check(ok=False, error=_describe(err) if detailed else _kind(err))
    result.latency_ms = round((time.perf_counter() - started) * 1000, 2)
    return result


def _kind(err: Exception) -> str:
    if isinstance(err, APIError):
        return "unreachable"
    return f"unreachable ({type(err).__name__})"


def _describe(err: Exception) -> str:
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(message)[:500]


def _database_probe(state: AppState) -> Callable[[], Awaitable[Any]]:
    def select_one() -> None:
        with state.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return lambda: asyncio.to_thread(select_one)


def _temporal_probe(state: AppState) -> Callable[[], Awaitable[Any]]:
    async def probe() -> None:
        # get() raises APIError 503 while Temporal has never been reachable; the SDK client,
        # once made, reconnects by itself when the server comes back.
        client = await state.temporal.get()
        await client.service_client.check_health(
            timeout=timedelta(seconds=state.settings.ready_timeout)
        )

    return probe


def _http_probe(url: str, timeout: float) -> Callable[[], Awaitable[Any]]:
    async def probe() -> None:
        async with httpx.AsyncClient(timeout=timeout) as http:
            response = await http.get(url)
            if response.status_code >= 400:
                raise RuntimeError(f"GET {url} answered {response.status_code}")

    return probe


def _redis_probe(url: str) -> Callable[[], Awaitable[Any]]:
    async def probe() -> None:
        from redis.asyncio import from_url  # only deployments with REDIS_URL need it

        client = from_url(url)
        try:
            await cast(Awaitable[Any], client.ping())  # typed sync|async by redis-py
        finally:
            await client.aclose()

    return probe


def _qdrant_url(state: AppState) -> str:
    return state.settings.qdrant_url.rstrip("/")


@public_router.get(
    "/ready",
    summary="Readiness: database, Temporal and (when configured) Qdrant and Redis answer.",
    responses={503: {"model": Readiness, "description": "A dependency does not answer."}},
)
async def ready(request: Request, response: Response) -> Readiness:
    state: AppState = request.app.state.chainloom
    timeout = state.settings.ready_timeout
    started = time.perf_counter()
    probes: dict[str, Callable[[], Awaitable[Any]]] = {
        "database": _database_probe(state),
        "temporal": _temporal_probe(state),
    }
    optional = {"qdrant": _qdrant_url(state), "redis": state.settings.redis_url}
    if optional["qdrant"]:
        probes["qdrant"] = _http_probe(f"{optional['qdrant']}/readyz", timeout)
    if optional["redis"]:
        probes["redis"] = _redis_probe(optional["redis"])
    results = await asyncio.gather(*(_check(p, timeout, False) for p in probes.values()))
    checks = dict(zip(probes, results, strict=True))
    for name, url in optional.items():
        if not url:
            checks[name] = Check(ok=True, skipped=True)
    ok = all(check.ok for check in checks.values())
    response.status_code = 200 if ok else 503
    return Readiness(
        status="ready" if ok else "not_ready",
        checks=ReadyChecks(**checks),
        total_latency_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def _disk_path(path: Path) -> Path:
    """The data directory, or its nearest existing parent (it may not be made yet)."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class Cpu(Camel):
    count: int
    percent: float
    load_average: list[float] = Field(description="1, 5 and 15 minutes.")


class Memory(Camel):
    total_mb: float = Field(alias="totalMB")
    used_mb: float = Field(alias="usedMB")
    available_mb: float = Field(alias="availableMB")
    percent: float


class Disk(Camel):
    path: str = Field(description="The data directory (or its nearest existing parent).")
    total_mb: float = Field(alias="totalMB")
    used_mb: float = Field(alias="usedMB")
    free_mb: float = Field(alias="freeMB")
    percent: float


class ProcessInfo(Camel):
    pid: int
    rss_mb: float = Field(alias="rssMB")
    threads: int
    open_files: int
    cpu_percent: float
    uptime_seconds: float


class Resources(Camel):
    cpu: Cpu
    memory: Memory
    disk: Disk
    process: ProcessInfo


def _resources(state: AppState) -> Resources:
    memory = psutil.virtual_memory()
    disk_at = _disk_path(state.settings.data_dir)
    disk = psutil.disk_usage(str(disk_at))
    proc = psutil.Process()
    with proc.oneshot():
        rss = proc.memory_info().rss
        threads = proc.num_threads()
        fds = proc.num_fds() if hasattr(proc, "num_fds") else len(proc.open_files())
        process_cpu = proc.cpu_percent(interval=None)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return Resources(
        cpu=Cpu(
            count=psutil.cpu_count() or 0,
            # A short sample: the first interval-less reading of a process is always 0.
            percent=psutil.cpu_percent(interval=0.1),
            load_average=[round(x, 2) for x in load],
        ),
        memory=Memory(
            total_mb=round(memory.total / _MB, 1),
            used_mb=round(memory.used / _MB, 1),
            available_mb=round(memory.available / _MB, 1),
            percent=memory.percent,
        ),
        disk=Disk(
            path=str(disk_at),
            total_mb=round(disk.total / _MB, 1),
            used_mb=round(disk.used / _MB, 1),
            free_mb=round(disk.free / _MB, 1),
            percent=disk.percent,
        ),
        process=ProcessInfo(
            pid=proc.pid,
            rss_mb=round(rss / _MB, 1),
            threads=threads,
            open_files=fds,
            cpu_percent=process_cpu,
            uptime_seconds=_uptime(state),
        ),
    )


@router.get("/system/resources", summary="CPU, memory and disk of this API process's host.")
async def system_resources(state: StateDep) -> Resources:
    return await asyncio.to_thread(_resources, state)


async def _pollers(client: Client, namespace: str, queue: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, kind in (
        ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    ):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
            )
        )
        counts[name] = len(response.pollers)
    return counts


class Service(Camel):
    """A service chainloom depends on; which other keys it has depends on `name`."""

    name: Literal["api", "database", "temporal", "workers", "qdrant", "redis"]
    status: Literal["up", "down", "unknown", "not_configured"]
    latency_ms: float | None = absent_when_none("How long its probe took.")
    error: str | None = absent_when_none("Why it is down or unknown.")
    version: str | None = absent_when_none("The API's version.")
    uptime_seconds: float | None = absent_when_none("How long the API process has run.")
    dialect: str | None = absent_when_none("database: sqlite or postgresql.")
    address: str | None = absent_when_none("The Temporal frontend.")
    namespace: str | None = absent_when_none("The Temporal namespace.")
    task_queue: str | None = absent_when_none("The task queue the workers poll.")
    pollers: int | None = absent_when_none("Workflow and activity pollers on it.")
    workflow_pollers: int | None = absent_when_none()
    activity_pollers: int | None = absent_when_none()
    url: str | None = absent_when_none("The Qdrant server.")


def _status(check: Check) -> dict[str, Any]:
    status = "up" if check.ok else "down"
    return {"status": status, "latency_ms": check.latency_ms, "error": check.error}


@router.get("/system/services", summary="Each service chainloom depends on and whether it is up.")
async def system_services(request: Request, state: StateDep) -> list[Service]:
    settings = state.settings
    timeout = settings.ready_timeout
    database, temporal = await asyncio.gather(
        _check(_database_probe(state), timeout), _check(_temporal_probe(state), timeout)
    )
    services = [
        Service(
            name="api", status="up", version=request.app.version, uptime_seconds=_uptime(state)
        ),
        Service(name="database", **_status(database), dialect=state.db.engine.dialect.name),
        Service(
            name="temporal",
            **_status(temporal),
            address=settings.temporal_address,
            namespace=settings.temporal_namespace,
        ),
    ]
    workers = Service(name="workers", status="unknown", task_queue=settings.task_queue)
    if temporal.ok:
        counts: dict[str, int] = {}

        async def describe() -> None:
            client = await state.temporal.get()
            counts.update(await _pollers(client, settings.temporal_namespace, settings.task_queue))

        check = await _check(describe, timeout)
        if check.ok:
            pollers = counts["workflow"] + counts["activity"]
            workers.status = "up" if pollers else "down"
            workers.pollers = pollers
            workers.workflow_pollers = counts["workflow"]
            workers.activity_pollers = counts["activity"]
        else:
            workers.error = check.error
    else:
        workers.error = "Temporal is not reachable"
    services.append(workers)
    qdrant = _qdrant_url(state)
    if qdrant:
        check = await _check(_http_probe(f"{qdrant}/readyz", timeout), timeout)
        services.append(Service(name="qdrant", **_status(check), url=qdrant))
    else:
        services.append(Service(name="qdrant", status="not_configured"))
    if settings.redis_url:
        check = await _check(_redis_probe(settings.redis_url), timeout)
        services.append(Service(name="redis", **_status(check)))
    return services


# ---- system administrators --------------------------------------------------------------
# Only another system administrator (or the bootstrap key) makes one: an email address is
# never verified, so no setting may grant the role by email.


class SystemAdminIn(BaseModel):
    email: str = Field(..., min_length=1, max_length=320)

    @field_validator("email")
    @classmethod
    def _normal(cls, value: str) -> str:
        return plain_text(value.strip().lower())


class SystemAdminOut(Camel):
    id: str
    email: str
    friendly_name: str
    tenant_id: str = Field(description="The tenant the user registered in.")
    created_at: Timestamp


@router.get("/system/admins", summary="Lists the users who are system administrators.")
def list_system_admins(state: StateDep) -> list[SystemAdminOut]:
    with state.db.session() as session:
        rows = session.exec(
            select(UserRow)
            .where(col(UserRow.system_admin).is_(True))
            .order_by(col(UserRow.created_at), col(UserRow.id))
        ).all()
        return [SystemAdminOut.model_validate(row) for row in rows]


@router.post(
    "/system/admins",
    status_code=201,
    summary="Makes the user with this email a system administrator.",
)
def add_system_admin(body: SystemAdminIn, state: StateDep) -> SystemAdminOut:
    with state.db.session() as session:
        user = session.exec(select(UserRow).where(UserRow.email == body.email)).first()
        if user is None:
            raise not_found("user", body.email)
        if not user.system_admin:
            user.system_admin = True
            user.updated_at = utcnow()
            session.add(user)
            session.commit()
        return SystemAdminOut.model_validate(user)


@router.delete(
    "/system/admins/{userId}",
    summary="Takes the system administrator role from a user (the user stays).",
)
def remove_system_admin(userId: str, state: StateDep) -> str:
    with state.db.session() as session:
        user = session.get(UserRow, userId)
        if user is None or not user.system_admin:
            raise not_found("system admin", userId)
        admins = session.exec(
            select(func.count()).select_from(UserRow).where(col(UserRow.system_admin).is_(True))
        ).one()
        if int(admins) <= 1 and not state.settings.api_key:
            # Without a bootstrap key nobody could ever name a system administrator again.
            raise APIError(
                409,
                "last_system_admin",
                "this is the last system administrator and no bootstrap key is configured",
            )
        user.system_admin = False
        user.updated_at = utcnow()
        session.add(user)
        session.commit()
    return "system admin removed"
