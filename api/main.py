"""The FastAPI application: `app` for uvicorn, `create_app()` for tests and embedding."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from temporalio.client import Client

from api import errors
from api.deps import AppState, TemporalHolder, require_auth
from api.routes import (
    affinity,
    backends,
    events,
    functions,
    groups,
    health,
    hooks,
    models,
    providers,
    queue,
    runs,
    state,
    taskchains,
    triggers,
)
from core.config import Settings, get_settings
from core.db import Database
from core.events import wait_for_background_dispatches

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
        app.state.chainloom = AppState(settings, db, TemporalHolder(settings, temporal))
        yield
        # Trigger dispatches still starting workflows for appends already answered.
        await wait_for_background_dispatches()
        clients = getattr(app.state, "probe_clients", None)
        if clients is not None:
            await clients.close()
        db.dispose()

    app = FastAPI(
        title="chainloom", version="0.1.0", description=API_DESCRIPTION, lifespan=lifespan
    )
    errors.install(app)
    app.include_router(health.router)
    secured = [Depends(require_auth)]
    for module in (
        taskchains,
        runs,
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
    ):
        app.include_router(module.router, dependencies=secured)
    return app


app = create_app()
