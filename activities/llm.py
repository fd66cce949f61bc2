"""LLM activities: the only place a model is called.

Routing happens here, at call time, so a backend added or fixed after a run started is used
by the run's calls within CHAINLOOM_BACKEND_MODELS_TTL. A transient failure moves to the next
backend serving the model in the same attempt; when none is left, the activity fails
retryably and Temporal tries again.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.backends import backend_refs
from core.db import Database
from core.providers import BackendRef, ProviderClients, ProviderError, same_model
from workflows.types import EmbedRequest, EmbedResult, LLMRequest, LLMResult, ModelChoice

PERMANENT = "PermanentLLMError"
T = TypeVar("T")


class LLMActivities:
    def __init__(
        self,
        db: Database,
        clients: ProviderClients,
        *,
        default_model: str = "",
        models_ttl: float = 30.0,
    ) -> None:
        self._db = db
        self._clients = clients
        self._default_model = default_model
        self._models_ttl = models_ttl
        # Reading the backend table on every call cost ~2 ms a step (benchmarks); the list
        # changes rarely, so it is kept as long as the backends' model lists.
        self._backends: dict[str, tuple[float, list[BackendRef]]] = {}

    @activity.defn(name="llm_chat")
    async def chat(self, req: LLMRequest) -> LLMResult:
        _check_token_limit(req)

        async def call(backend: BackendRef, model: str) -> LLMResult:
            answer = await self._clients.chat(backend, model, req.messages, req.temperature)
            return LLMResult(
                content=answer.content,
                model=model,
                backend=backend.name,
                input_tokens=answer.input_tokens,
                output_tokens=answer.output_tokens,
                tool_calls=answer.tool_calls,
            )

        return await _with_heartbeat(self._route(req.tenant_id, req.choice, call))

    @activity.defn(name="llm_embed")
    async def embed(self, req: EmbedRequest) -> EmbedResult:
        async def call(backend: BackendRef, model: str) -> EmbedResult:
            vector = await self._clients.embed(backend, model, req.text)
            return EmbedResult(vector=vector, model=model, backend=backend.name)

        return await _with_heartbeat(self._route(req.tenant_id, req.choice, call))

    async def candidates(
        self, tenant_id: str, choice: ModelChoice
    ) -> tuple[list[tuple[BackendRef, str]], list[str]]:
        """Backends able to serve the call, in preference order, and why others were not."""
        models = [m for m in [choice.model, *choice.models] if m] or (
            [self._default_model] if self._default_model else []
        )
        if not models:
            raise ApplicationError(
                "the task names no model (execute_config.model) and no default model is set",
                type=PERMANENT,
                non_retryable=True,
            )
        allowed = {p for p in [choice.provider, *choice.providers] if p}
        backends = await self._tenant_backends(tenant_id)
        if allowed:
            backends = [b for b in backends if b.type in allowed]
        listings: dict[str, list[str]] = {}
        unreachable: list[str] = []
        for backend in backends:
            try:
                listings[backend.id] = await self._clients.list_models(backend, self._models_ttl)
            except ProviderError as err:
                unreachable.append(str(err))
        found = [
            (backend, model)
            for model in models
            for backend in backends
            if any(same_model(model, served) for served in listings.get(backend.id, []))
        ]
        return found, unreachable

    async def _tenant_backends(self, tenant_id: str) -> list[BackendRef]:
        cached = self._backends.get(tenant_id)
        if cached and time.monotonic() - cached[0] < self._models_ttl:
            return cached[1]
        backends = await asyncio.to_thread(backend_refs, self._db, tenant_id)
        self._backends[tenant_id] = (time.monotonic(), backends)
        return backends

    async def _route(
        self,
        tenant_id: str,
        choice: ModelChoice,
        call: Callable[[BackendRef, str], Awaitable[T]],
    ) -> T:
        found, unreachable = await self.candidates(tenant_id, choice)
        wanted = ", ".join(m for m in [choice.model, *choice.models] if m) or self._default_model
        if not found:
            if unreachable:
                # The model may live on a backend that is down right now: worth retrying.
                raise ApplicationError(
                    f"no reachable backend serves {wanted}: " + "; ".join(unreachable),
                    type="BackendUnavailable",
                )
            raise ApplicationError(
                f"no backend serves model {wanted}"
                + (
                    f" (provider {sorted({choice.provider, *choice.providers} - {''})})"
                    if choice.provider or choice.providers
                    else ""
                ),
                type=PERMANENT,
                non_retryable=True,
            )
        errors: list[str] = []
        for backend, model in found:
            try:
                return await call(backend, model)
            except ProviderError as err:
                if not err.transient:
                    raise ApplicationError(str(err), type=PERMANENT, non_retryable=True) from err
                self._clients.forget(backend.id)
                self._backends.pop(tenant_id, None)
                errors.append(str(err))
                activity.logger.warning("failing over from %s: %s", backend.name, err)
        raise ApplicationError("; ".join(errors), type="BackendUnavailable")


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
            type=PERMANENT,
            non_retryable=True,
        )


async def _with_heartbeat(work: Awaitable[T]) -> T:
    """Heartbeat while the call runs, so a dead worker is noticed within the heartbeat timeout."""
    info = activity.info()
    timeout = info.heartbeat_timeout
    if not timeout:
        return await work
    interval = max(timeout.total_seconds() / 3, 0.2)

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat()

    beater = asyncio.create_task(beat())
    try:
        return await work
    finally:
        beater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beater


def all_activities(obj: LLMActivities) -> list[Callable[..., Any]]:
    return [obj.chat, obj.embed]
