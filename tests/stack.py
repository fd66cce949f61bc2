"""A whole chainloom stack in one test process: worker and API, each on its own thread and loop.

The worker gets its own event loop so that a synchronous test blocking on HTTP never starves
it; the API is real uvicorn on a loopback port, so tests speak real HTTP.
"""

import asyncio
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.fernet import Fernet

from api.main import create_app
from core.config import Settings
from core.db import Database
from core.devserver import free_port
from core.temporal import connect
from worker import build_worker


class WorkerThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="worker")

    def start(self) -> "WorkerThread":
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("worker did not start")
        if self._error:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._run())

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        db = Database(self.settings.resolved_database_url())
        try:
            client = await connect(self.settings)
            closing: list[Any] = []
            worker = build_worker(client, self.settings, db, closing=closing)
            async with worker:
                self._ready.set()
                await self._stop.wait()
            for close in closing:
                await close()
        except BaseException as err:  # surfaced to the starting test
            self._error = err
            self._ready.set()
        finally:
            db.dispose()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


class ApiThread:
    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            proxy_headers=False,  # as `chainloom api` runs it (api/proxies.py)
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="api")

    def start(self) -> "ApiThread":
        self._thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            threading.Event().wait(0.05)
        raise TimeoutError("API did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)


class Stack:
    """Settings, a worker and the API, sharing one database and a fresh task queue."""

    API_KEY = "test-key-" + uuid.uuid4().hex
    SECRET_KEY = Fernet.generate_key().decode()

    def __init__(self, temporal_address: str, database_url: str, **overrides: Any) -> None:
        self.settings = self.settings_for(temporal_address, database_url, **overrides)
        self.worker = WorkerThread(self.settings).start()
        self.api = ApiThread(self.settings).start()
        self.http = httpx.Client(
            base_url=self.api.url, headers={"X-API-Key": self.API_KEY}, timeout=120
        )

    @classmethod
    def settings_for(cls, temporal_address: str, database_url: str, **overrides: Any) -> Settings:
        """Settings for a fresh task queue on a migrated database."""
        values: dict[str, Any] = {
            "TEMPORAL_ADDRESS": temporal_address,
            "DATABASE_URL": database_url,
            "CHAINLOOM_API_KEY": cls.API_KEY,
            "CHAINLOOM_TASK_QUEUE": "test-" + uuid.uuid4().hex[:12],
            "CHAINLOOM_LLM_HEARTBEAT_TIMEOUT": 5,
            "CHAINLOOM_TOOL_HEARTBEAT_TIMEOUT": 5,
            # A stack closing with a call in flight need not wait for it.
            "CHAINLOOM_WORKER_SHUTDOWN_GRACE": 2,
            "CHAINLOOM_BACKEND_MODELS_TTL": 0,
            "CHAINLOOM_ROUTING_CACHE_SECONDS": 0,
            "CHAINLOOM_SECRET_KEY": cls.SECRET_KEY,
            # The scripted LLM listens on 127.0.0.1; other loopback addresses stay refused.
            "CHAINLOOM_BACKEND_ALLOWLIST": "127.0.0.1",
            "CHAINLOOM_DATA_DIR": tempfile.mkdtemp(prefix="chainloom-test-"),
            # Shared stacks serve many tests a minute; rate-limit tests set their own limits.
            "CHAINLOOM_RATE_LIMIT": "1000000/minute",
            "CHAINLOOM_TENANT_RATE_LIMIT": "1000000/minute",
            "CHAINLOOM_LOGIN_RATE_LIMIT": "1000000/minute",
            **overrides,
        }
        Database(database_url).migrate()
        return Settings(**values)

    @staticmethod
    def env_for(settings: Settings) -> dict[str, str]:
        """The same settings as environment variables, for a chainloom subprocess."""
        env: dict[str, str] = {}
        for name, field in Settings.model_fields.items():
            value = getattr(settings, name)
            if field.alias and value not in (None, ""):
                env[field.alias] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def close(self) -> None:
        self.http.close()
        self.api.stop()
        self.worker.stop()


def dev_command(port: int, temporal_port: int, ui_port: int, data_dir: Path) -> list[str]:
    """`chainloom dev` on the given ports and data directory, as a subprocess argument list."""
    return [
        sys.executable,
        "-m",
        "cli.main",
        "dev",
        "--port",
        str(port),
        "--temporal-port",
        str(temporal_port),
        "--ui-port",
        str(ui_port),
        "--data-dir",
        str(data_dir),
    ]
