"""The FastAPI application: `app` for uvicorn, `create_app()` for tests and embedding."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from temporalio.client import Client

from api import errors
from api.deps import AppState, TemporalHolder, require_auth
from api.middleware import RequestContext
from api.routes import (
    access,
    activity,
    affinity,
    apikeys,
    auth,
    backends,
    events,
    functions,
    groups,
    hooks,
    me,
    models,
    ops,
    providers,
    queue,
    run_values,
    runs,
    state,
    taskchains,
    tenants,
    triggers,
    users,
)
from api.routes import usage as usage_routes
from core.config import Settings, get_settings
from core.db import Database
from core.events.dispatch import wait_for_background_dispatches
from core.events.outbox import TriggerDispatcher
from core.identity.credentials import Tokens
from core.metering.ratelimit import RateLimiter
from core.metering.request_log import RequestLog
from core.metering.usage import UsageMeter
from core.secrets import SecretBox

API_DESCRIPTION = (
    "Durable LLM task chains on Temporal. Follows the contenox runtime API (seed 003): "
    "every route except /health needs an API key in `X-API-Key` or `Authorization: Bearer`."
)


def create_app(settings: Settings | None = None, temporal: Client | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url())
        db.migrate()
        secret = settings.jwt_secret.encode() or SecretBox.from_settings(settings).derive("jwt")
        tokens = Tokens(secret, settings.access_token_ttl, settings.refresh_token_ttl)
        usage = UsageMeter(db, settings)
        holder = TemporalHolder(settings, temporal)
        triggers = TriggerDispatcher(db, holder.get, settings)
        app.state.chainloom = AppState(
            settings, db, holder, tokens, RateLimiter(settings), usage, triggers
        )
        app.state.request_log = request_log = RequestLog(db, settings.request_log_days)
        usage.start()
        request_log.start()
        triggers.start()
        yield
        await request_log.stop()
        await usage.stop()
        # Trigger dispatches still starting workflows for appends already answered; what is
        # left after the grace stays in the outbox for another process's sweeper.
        await wait_for_background_dispatches()
        await triggers.stop()
        clients = getattr(app.state, "probe_clients", None)
        if clients is not None:
            await clients.close()
        db.dispose()

    app = FastAPI(
        title="chainloom", version="0.1.0", description=API_DESCRIPTION, lifespan=lifespan
    )
    errors.install(app)
    app.add_middleware(RequestContext, settings=settings)
    for module in (ops, auth):
        app.include_router(module.public_router)
    secured = [Depends(require_auth)]
    for module in (
        taskchains,
        runs,
        run_values,
        backends,
        models,
        state,
        groups,
        affinity,
        providers,
        queue,
        events,
        triggers,
        hooks,
        functions,
        me,
        users,
        apikeys,
        tenants,
        access,
        usage_routes,
        ops,
        activity,
    ):
        app.include_router(module.router, dependencies=secured)
    return app


app = create_app()
