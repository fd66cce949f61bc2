"""Shared fixtures: one Temporal dev server, PostgreSQL and SQLite databases, a scripted LLM."""

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from temporalio.testing import WorkflowEnvironment

from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process, temporal_binary
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack
from workflows.contracts import ALL_SEARCH_ATTRIBUTES

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def temporal_address() -> Iterator[str]:
    port = free_port()
    proc = start_dev_server(None, port)
    yield f"127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of our own on the machine's PostgreSQL, dropped at the end."""
    name = "chainloom_test_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("db") / "chainloom.db"
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's own (not migrated), on each kind; dropped at the end.

    For tests that must not share the stack's database, whose API process sweeps it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    name = "chainloom_fresh_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture(scope="session")
def llm_server() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM(models=["gpt-4o-mini", "llama3.2", "nomic-embed-text"]).start()
    yield server
    server.stop()


@pytest.fixture
def llm(llm_server: ScriptedLLM) -> ScriptedLLM:
    llm_server.reset()
    llm_server.models[:] = ["gpt-4o-mini", "llama3.2", "nomic-embed-text"]
    return llm_server


@pytest.fixture(scope="session")
def stack(temporal_address: str, database_url: str) -> Iterator[Stack]:
    s = Stack(temporal_address, database_url)
    yield s
    s.close()


@pytest.fixture
def clean_stack(stack: Stack, llm: ScriptedLLM) -> Stack:
    """The stack with no backends, models or chains left from another test."""
    for path, key in (("/backends", "id"), ("/models", "id"), ("/taskchains", "id")):
        for item in stack.http.get(path, params={"limit": 1000}).json():
            stack.http.delete(f"{path}/{item[key]}")
    return stack


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client to the stack's API with no credentials of its own."""
    with httpx.Client(base_url=stack.api.url, timeout=60) as c:
        yield c


@pytest.fixture
def db(stack: Stack) -> Iterator[Database]:
    """The stack's database, for reading what the API stored."""
    database = Database(stack.settings.resolved_database_url())
    yield database
    database.dispose()


# A Temporal dev server of its own for WorkflowEnvironment tests (workers, histories, replay).
@pytest.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    args: list[str] = []
    for key in (
        "history.transferProcessorMaxPollRPS",
        "history.timerProcessorMaxPollRPS",
        "history.visibilityProcessorMaxPollRPS",
    ):
        args += ["--dynamic-config-value", f"{key}=10000"]
    for attr in ALL_SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{attr.name}=Keyword"]
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), dev_server_extra_args=args
    )
    yield environment
    await environment.shutdown()
