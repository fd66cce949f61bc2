"""The chainloom Temporal worker (same as `chainloom worker`)."""

import asyncio
import logging
import signal
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.downloads import DownloadActivities
from activities.functions import FunctionActivities
from activities.hooks import HookActivities
from activities.llm import LLMActivities, all_activities
from activities.sync import SyncActivities
from core.backends.providers import ProviderClients
from core.config import Settings, get_settings
from core.db import Database
from core.events.outbox import TriggerDispatcher
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
    "pydantic",
    "pydantic_core",
    "jinja2",
    "markupsafe",
)


def build_worker(
    client: Client,
    settings: Settings,
    db: Database,
    clients: ProviderClients | None = None,
    task_queue: str | None = None,
) -> Worker:
    secrets = SecretBox.from_settings(settings)
    llm = LLMActivities(
        db,
        clients or ProviderClients(timeout=settings.llm_timeout),
        secrets=secrets,
        default_model=settings.default_model,
        models_ttl=settings.backend_models_ttl,
        tables_ttl=settings.routing_cache_seconds,
        groups_enabled=settings.groups_enabled,
        down_seconds=settings.backend_down_seconds,
        token_quota=settings.token_quota,
    )
    sync = SyncActivities(
        db,
        ProviderClients(timeout=10.0),
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
            DownloadActivities(db).pull,
            *hooks.activities(),
            *functions.activities(),
        ],
        # Heartbeats reach the server at most this often (the SDK's default is 0.8 x the
        # heartbeat timeout, 4 s for a pull): model-pull progress is read from them.
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
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
    worker = build_worker(client, settings, db)
    # Every worker also sweeps the trigger outbox, so starts owed by an API process that died
    # are made even when no API process is left (core/events/outbox.py).
    triggers = TriggerDispatcher(db, client, settings)
    triggers.start()
    log.info("worker polling task queue %r on %s", settings.task_queue, settings.temporal_address)
    async with worker:
        await stop.wait()
    await triggers.stop()
    db.dispose()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_worker(get_settings()))


if __name__ == "__main__":
    main()
