"""The chainloom Temporal worker (same as `chainloom worker`)."""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta

import jinja2
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.downloads import DownloadActivities
from activities.functions import FunctionActivities
from activities.hooks import HookActivities
from activities.llm import LLMActivities, all_activities
from activities.run_store import RunStoreActivities
from activities.sync import SyncActivities
from chains.engine import TaskFailure
from core.backends.providers import ProviderClients
from core.config import Settings, get_settings
from core.db import Database
from core.events.outbox import TriggerDispatcher
from core.sandbox.pool import QUEUE_PER_HOST
from core.schedules import ensure_state_sync
from core.secrets import SecretBox
from core.temporal import connect, ensure_search_attributes
from workflows.chain import ChainWorkflow
from workflows.downloads import ModelDownloadWorkflow
from workflows.function import FunctionWorkflow
from workflows.sync import StateSyncWorkflow

log = logging.getLogger("chainloom.worker")

WORKFLOWS = [ChainWorkflow, StateSyncWorkflow, ModelDownloadWorkflow, FunctionWorkflow]

# Modules the workflow sandbox may share instead of re-importing per run: they are
# deterministic, and re-importing pydantic/jinja2 for every run costs hundreds of ms.
PASSTHROUGH = (
    "chains",
    "workflows.types",
    "workflows.contracts",
    "workflows.download_types",
    "workflows.values",
    "workflows.chain_store",
    "workflows.chain_tools",
    "workflows.chain_run",
    "workflows.payloads",
    "pydantic",
    "pydantic_core",
    "jinja2",
    "markupsafe",
)

# Exceptions from chainloom's own deterministic workflow code (a chain with a `gt` branch whose
# `when` is no number, a definition that no longer validates, a bug meeting odd data). The SDK
# retries the workflow task on anything that is not a Temporal failure, and a retry replays the
# same history into the same code: the run would stay `running` forever. These fail the run
# with their message instead. NondeterminismError (and its bases) are left out on purpose: a
# run that meets changed code recovers when the old code is deployed again.
WORKFLOW_FAILURE_TYPES: tuple[type[BaseException], ...] = (
    TaskFailure,
    jinja2.TemplateError,
    ValueError,
    TypeError,
    LookupError,
    ArithmeticError,
    AttributeError,
    RecursionError,
)


def build_worker(
    client: Client,
    settings: Settings,
    db: Database,
    clients: ProviderClients | None = None,
    task_queue: str | None = None,
    closing: list[Callable[[], Awaitable[None]]] | None = None,
) -> Worker:
    """The worker with every workflow and activity. `closing` collects what must run once the
    worker has stopped (writing the last counted model tokens)."""
    secrets = SecretBox.from_settings(settings)
    llm = LLMActivities(
        db,
        clients or ProviderClients(settings.llm_timeout, settings.backend_allowlist),
        secrets=secrets,
        default_model=settings.default_model,
        models_ttl=settings.backend_models_ttl,
        tables_ttl=settings.routing_cache_seconds,
        groups_enabled=settings.groups_enabled,
        down_seconds=settings.backend_down_seconds,
        token_quota=settings.token_quota,
    )
    if closing is not None:
        closing.append(llm.tokens.close)
    sync = SyncActivities(
        db,
        ProviderClients(10.0, settings.backend_allowlist),
        task_queue=task_queue or settings.task_queue,
        down_seconds=settings.backend_down_seconds,
        delete_undeclared=settings.sync_delete_undeclared,
        secrets=secrets,
    )
    hooks = HookActivities(db, secrets, settings)
    functions = FunctionActivities(db, settings, llm=llm, hooks=hooks)
    hooks.run_js = functions.run
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=[
            *all_activities(llm),
            sync.sync_backends,
            DownloadActivities(db, settings.backend_allowlist).pull,
            *hooks.activities(),
            *functions.activities(),
            *RunStoreActivities(db).activities(),
        ],
        # Temporal's default is 100. JS calls hold at most (1 + QUEUE_PER_HOST) x
        # CHAINLOOM_JS_POOL_MAX of them (a host each, or a place in the pool's bounded queue;
        # more are refused at once and retried), so at least half stay for model calls, hooks
        # and the rest however many JS calls wait.
        max_concurrent_activities=max(100, 2 * (1 + QUEUE_PER_HOST) * settings.js_pool_max),
        # Heartbeats reach the server at most this often (the SDK's default is 0.8 x the
        # heartbeat timeout, 4 s for a pull): model-pull progress is read from them.
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        # A dead worker's cached runs wait this long on its sticky queue before any worker may
        # take them (the SDK's 10 s would freeze every run it had in flight).
        sticky_queue_schedule_to_start_timeout=timedelta(seconds=settings.sticky_timeout),
        # On shutdown no new task is taken; running activities get this long to finish.
        graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
        workflow_failure_exception_types=WORKFLOW_FAILURE_TYPES,
    )


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    db = Database(settings.resolved_database_url())
    db.migrate()
    client = await connect(settings)
    await ensure_search_attributes(client)
    await ensure_state_sync(client, settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    closing: list[Callable[[], Awaitable[None]]] = []
    worker = build_worker(client, settings, db, closing=closing)
    # Every worker also sweeps the trigger outbox, so starts owed by an API process that died
    # are made even when no API process is left (core/events/outbox.py).
    triggers = TriggerDispatcher(db, client, settings)
    triggers.start()
    async with worker:
        log.info(
            "worker polling task queue %r on %s", settings.task_queue, settings.temporal_address
        )
        await stop.wait()
        log.info(
            "worker stopping: no new tasks; running activities get up to %.0f s",
            settings.shutdown_grace,
        )
    await triggers.stop()
    for close in closing:
        await close()
    log.info("worker stopped")
    db.dispose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_worker(get_settings()))


if __name__ == "__main__":
    main()
