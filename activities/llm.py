"""LLM activities: the only place a model is called.

Routing happens here, at call time, so backends added, fixed or marked down after a run
started are taken into account by the run's next call (within CHAINLOOM_BACKEND_MODELS_TTL).
Order of preference: the task's model, then its `models` fallbacks, then the default model;
for each, the backends serving it (narrowed by provider, and by affinity group when groups
are enabled). Backends marked down come last. A transient failure marks the backend down and
moves to the next candidate in the same attempt; when none is left the activity fails
retryably and Temporal tries again later.

Errors that reach the run (and so anyone who reads it) name the backend and say only
"unreachable" or "refused"; what the backend or the network said goes to the worker log and
the backend's state (GET /state shows it to admins), as its address may have been chosen by
someone probing what answers there.
"""

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.run_store import read_back
from core.backends.health import Health, group_pairs, load_health, mark_down, mark_up, note_error
from core.backends.providers import BackendRef, ProviderClients, ProviderError, same_model
from core.backends.refs import backend_refs
from core.db import Database
from core.metering.usage import Quota, TokenTally, token_quota
from core.models import utcnow
from core.secrets import SecretBox
from workflows.contracts import (
    BACKEND_UNAVAILABLE,
    LLM_CHAT,
    LLM_EMBED,
    PERMANENT_LLM_ERROR,
    QUOTA_EXCEEDED,
)
from workflows.types import EmbedRequest, EmbedResult, LLMRequest, LLMResult, ModelChoice

T = TypeVar("T")


@dataclass
class Candidate:
    backend: BackendRef
    model: str
    down: bool


@dataclass
class _TenantView:
    """What routing needs of a tenant, read in one go and kept for a short while."""

    fetched: float
    backends: list[BackendRef]
    health: dict[str, Health]
    pairs: set[tuple[str, str]] | None


class LLMActivities:
    def __init__(
        self,
        db: Database,
        clients: ProviderClients,
        *,
        secrets: SecretBox | None = None,
        default_model: str = "",
        models_ttl: float = 30.0,
        tables_ttl: float = 5.0,
        groups_enabled: bool = False,
        down_seconds: float = 30.0,
        token_quota: int = 0,
    ) -> None:
        self._db = db
        # Tokens counted after each call, written off the call's path (worker.py closes it).
        self.tokens = TokenTally(db)
        self._token_quota_default = token_quota
        # Per tenant: (when read, this month's tokens against the quota), kept like the views.
        self._quotas: dict[str, tuple[float, Quota]] = {}
        self._clients = clients
        self._secrets = secrets
        self._default_model = default_model
        self._models_ttl = models_ttl
        self._tables_ttl = tables_ttl
        self._groups_enabled = groups_enabled
        self._down_seconds = down_seconds
        # Reading the tables on every call cost ~2 ms a step (benchmarks); they change rarely.
        self._views: dict[str, _TenantView] = {}

    async def _check_quota(self, tenant_id: str) -> None:
        """Refuses a model call once the tenant's monthly token quota is used up.

        The API refuses new runs then; this also stops runs already going and those started
        by event triggers, so no path spends past the quota by more than the call in flight.
        """
        cached = self._quotas.get(tenant_id)
        if cached is None or time.monotonic() - cached[0] > self._tables_ttl:
            quota = await asyncio.to_thread(
                token_quota, self._db, tenant_id, self._token_quota_default
            )
            cached = (time.monotonic(), quota)
            self._quotas[tenant_id] = cached
        quota = cached[1].plus(self.tokens.pending(tenant_id))
        if quota.exhausted:
            raise ApplicationError(
                f"monthly token quota of {quota.limit} is used up ({quota.used} used); "
                "it resets at the start of next month (UTC)",
                type=QUOTA_EXCEEDED,
                non_retryable=True,
            )

    @activity.defn(name=LLM_CHAT)
    async def chat(self, req: LLMRequest) -> LLMResult:
        # A long chat history reaches us compacted: its earlier messages are in the run's
        # records (docs/chains.md, "Long and large chains").
        messages = await read_back(self._db, req.tenant_id, req.messages, PERMANENT_LLM_ERROR)
        if messages is not req.messages:
            req = dataclasses.replace(req, messages=messages)
        _check_token_limit(req)
        await self._check_quota(req.tenant_id)

        async def call(backend: BackendRef, model: str) -> LLMResult:
            tools = [
                {"name": t.name, "description": t.description, "parameters": t.parameters}
                for t in req.tools
            ]
            answer = await self._clients.chat(backend, model, req.messages, req.temperature, tools)
            return LLMResult(
                content=answer.content,
                model=model,
                backend=backend.name,
                input_tokens=answer.input_tokens,
                output_tokens=answer.output_tokens,
                tool_calls=answer.tool_calls,
            )

        result, failed = await heartbeating(self._route(req.tenant_id, req.choice, call))
        result.failed_over = failed
        # Only here, after the call succeeded: a failed attempt Temporal retries counts nothing.
        self._count_tokens(req.tenant_id, result.input_tokens + result.output_tokens)
        return result

    def _count_tokens(self, tenant_id: str, tokens: int) -> None:
        """Adds to the tenant's monthly token usage (core/metering) without waiting on the
        database; never fails the call."""
        self.tokens.add(tenant_id, tokens)

    @activity.defn(name=LLM_EMBED)
    async def embed(self, req: EmbedRequest) -> EmbedResult:
        await self._check_quota(req.tenant_id)

        async def call(backend: BackendRef, model: str) -> EmbedResult:
            vector, tokens = await self._clients.embed(backend, model, req.text)
            return EmbedResult(vector=vector, model=model, backend=backend.name, tokens=tokens)

        result, failed = await heartbeating(self._route(req.tenant_id, req.choice, call))
        result.failed_over = failed
        self._count_tokens(req.tenant_id, result.tokens)
        return result

    def _load_view(self, tenant_id: str) -> _TenantView:
        backends = backend_refs(self._db, tenant_id, self._secrets)
        pairs = group_pairs(self._db, tenant_id) if self._groups_enabled else None
        return _TenantView(time.monotonic(), backends, load_health(self._db, tenant_id), pairs)

    async def _view(self, tenant_id: str) -> _TenantView:
        view = self._views.get(tenant_id)
        if view is None or time.monotonic() - view.fetched >= self._tables_ttl:
            view = await asyncio.to_thread(self._load_view, tenant_id)
            self._views[tenant_id] = view
        return view

    async def candidates(
        self, tenant_id: str, choice: ModelChoice, *, fresh: bool = False
    ) -> tuple[list[Candidate], list[str]]:
        """Backends able to serve the call, in preference order, and why others were not.

        `fresh` bypasses the caches (tables and model lists)."""
        models = [m for m in [choice.model, *choice.models] if m] or (
            [self._default_model] if self._default_model else []
        )
        if not models:
            raise ApplicationError(
                "the task names no model (execute_config.model) and no default model is set",
                type=PERMANENT_LLM_ERROR,
                non_retryable=True,
            )
        if fresh:
            self._views.pop(tenant_id, None)
        view = await self._view(tenant_id)
        allowed = {p for p in [choice.provider, *choice.providers] if p}
        backends = [b for b in view.backends if not allowed or b.type in allowed]
        now = utcnow()
        listings: dict[str, list[str]] = {}
        unreachable: list[str] = []
        for backend in backends:
            health = view.health.get(backend.id, Health())
            try:
                max_age = 0.0 if fresh else self._models_ttl
                listings[backend.id] = await self._clients.list_models(backend, max_age)
            except ProviderError as err:
                unreachable.append(err.public)
                # The last list we saw still says what it serves once it comes back.
                listings[backend.id] = health.models
                if err.transient and not health.is_down(now):
                    view.health[backend.id] = await self._mark_down(tenant_id, backend, str(err))
                elif not err.transient and health.last_error != str(err):
                    # A refused address: admins find why in GET /state.
                    await asyncio.to_thread(note_error, self._db, tenant_id, backend.id, str(err))
                    health.last_error = str(err)
                    view.health[backend.id] = health
        up: list[Candidate] = []
        down: list[Candidate] = []
        for model in models:
            for backend in backends:
                if view.pairs is not None and not any(
                    b == backend.id and same_model(m, model) for b, m in view.pairs
                ):
                    continue
                if any(same_model(model, served) for served in listings.get(backend.id, [])):
                    is_down = view.health.get(backend.id, Health()).is_down(now)
                    (down if is_down else up).append(Candidate(backend, model, is_down))
        return up + down, unreachable

    async def _mark_down(self, tenant_id: str, backend: BackendRef, error: str) -> Health:
        activity.logger.warning("backend %s marked down: %s", backend.name, error)
        self._clients.forget(backend.id)
        return await asyncio.to_thread(
            mark_down, self._db, tenant_id, backend.id, error, self._down_seconds
        )

    async def _route(
        self,
        tenant_id: str,
        choice: ModelChoice,
        call: Callable[[BackendRef, str], Awaitable[T]],
    ) -> tuple[T, list[str]]:
        found, unreachable = await self.candidates(tenant_id, choice)
        if not found:
            # The caches may predate a backend or model added a moment ago: look again before
            # failing the task for good.
            found, unreachable = await self.candidates(tenant_id, choice, fresh=True)
        wanted = ", ".join(m for m in [choice.model, *choice.models] if m) or self._default_model
        if not found:
            if unreachable:
                # The model may live on a backend that is down right now: worth retrying.
                raise ApplicationError(
                    f"no reachable backend serves {wanted}: " + "; ".join(unreachable),
                    type=BACKEND_UNAVAILABLE,
                )
            scope = " in a shared affinity group" if self._groups_enabled else ""
            providers = sorted({choice.provider, *choice.providers} - {""})
            restrict = f" of type {', '.join(providers)}" if providers else ""
            raise ApplicationError(
                f"no backend{restrict} serves model {wanted}{scope}",
                type=PERMANENT_LLM_ERROR,
                non_retryable=True,
            )
        view = self._views.get(tenant_id)
        errors: list[str] = []
        failed: list[str] = []
        for candidate in found:
            backend = candidate.backend
            try:
                result = await call(backend, candidate.model)
            except ProviderError as err:
                if not err.transient:
                    activity.logger.warning("backend %s failed: %s", backend.name, err)
                    await asyncio.to_thread(note_error, self._db, tenant_id, backend.id, str(err))
                    raise ApplicationError(
                        err.public, type=PERMANENT_LLM_ERROR, non_retryable=True
                    ) from None
                errors.append(err.public)
                failed.append(backend.name)
                health = await self._mark_down(tenant_id, backend, str(err))
                if view is not None:
                    view.health[backend.id] = health
                continue
            if candidate.down or (view and view.health.get(backend.id, Health()).failures):
                await asyncio.to_thread(mark_up, self._db, tenant_id, backend.id)
                if view is not None:
                    view.health[backend.id] = Health()
            return result, failed
        raise ApplicationError("; ".join(errors), type=BACKEND_UNAVAILABLE)


def _check_token_limit(req: LLMRequest) -> None:
    if req.token_limit <= 0:
        return
    # A cheap estimate (about four characters a token) keeps us from paying for a call that
    # the chain's own limit forbids.
    chars = sum(len(str(m.get("content") or "")) for m in req.messages)
    estimate = chars // 4
    if estimate > req.token_limit:
        raise ApplicationError(
            f"prompt of about {estimate} tokens exceeds the chain's token_limit {req.token_limit}",
            type=PERMANENT_LLM_ERROR,
            non_retryable=True,
        )


def all_activities(obj: LLMActivities) -> list[Callable[..., Any]]:
    return [obj.chat, obj.embed]
