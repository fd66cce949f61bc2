"""The state-sync activity: refresh every backend's health and models, queue missing ones."""

import asyncio
from typing import Any

from sqlmodel import col, select
from temporalio import activity

from activities.heartbeat import heartbeating
from core.backends.health import mark_down, mark_up
from core.backends.keys import ProviderKey, provider_keys
from core.backends.providers import ProviderClients, ProviderError, same_model
from core.backends.refs import to_ref
from core.db import Database
from core.models import BackendRow, ModelRow
from core.secrets import SecretBox
from workflows.contracts import SYNC_BACKENDS


class SyncActivities:
    def __init__(
        self,
        db: Database,
        clients: ProviderClients,
        *,
        task_queue: str,
        down_seconds: float,
        secrets: SecretBox | None = None,
        delete_undeclared: bool = False,
    ) -> None:
        self._db = db
        self._clients = clients
        self._task_queue = task_queue
        self._down_seconds = down_seconds
        self._delete_undeclared = delete_undeclared
        self._secrets = secrets

    def _load(
        self,
    ) -> tuple[list[BackendRow], dict[str, list[str]], dict[str, dict[str, ProviderKey]]]:
        with self._db.session() as session:
            backends = list(session.exec(select(BackendRow).order_by(col(BackendRow.created_at))))
            declared: dict[str, list[str]] = {}
            for row in session.exec(select(ModelRow)):
                declared.setdefault(row.tenant_id, []).append(row.model)
        # Hosted providers answer a model listing only with their key.
        box = self._secrets
        keys = {
            t: provider_keys(self._db, box, t) if box else {}
            for t in {r.tenant_id for r in backends}
        }
        return backends, declared, keys

    @activity.defn(name=SYNC_BACKENDS)
    async def sync_backends(self) -> dict[str, Any]:
        # A pass waits on every backend (a slow one up to the client's timeout); beating lets
        # a lost worker's pass be retried in seconds, not at the start-to-close timeout.
        return await heartbeating(self._sync())

    async def _sync(self) -> dict[str, Any]:
        backends, declared, keys = await asyncio.to_thread(self._load)
        summary: dict[str, Any] = {
            "backends": len(backends),
            "healthy": 0,
            "queued": [],
            "deleted": [],
        }

        async def one(row: BackendRow) -> None:
            ref = to_ref(row, keys.get(row.tenant_id))
            try:
                described = await self._clients.describe_models(ref)
            except ProviderError as err:
                await asyncio.to_thread(
                    mark_down, self._db, row.tenant_id, row.id, str(err), self._down_seconds
                )
                return
            names = [d["model"] for d in described]
            await asyncio.to_thread(mark_up, self._db, row.tenant_id, row.id, names, described)
            summary["healthy"] += 1
            if row.type != "ollama":
                return
            wanted = declared.get(row.tenant_id, [])
            for model in wanted:
                if not any(same_model(model, have) for have in names):
                    await self._enqueue(row, model)
                    summary["queued"].append({"backend": row.name, "model": model})
            if self._delete_undeclared:
                for have in names:
                    if not any(same_model(have, model) for model in wanted):
                        await self._clients.delete_model(ref, have)
                        summary["deleted"].append({"backend": row.name, "model": have})

        await asyncio.gather(*(one(row) for row in backends))
        activity.logger.info("state sync: %s", summary)
        return summary

    async def _enqueue(self, row: BackendRow, model: str) -> None:
        from core.backends.downloads import enqueue_download

        try:
            client = activity.client()
            await enqueue_download(client, self._task_queue, row.tenant_id, row.id, model)
        except Exception as err:  # a failed enqueue must not stop the health refresh
            activity.logger.warning("could not queue %s on %s: %s", model, row.name, err)
