"""Durable model downloads: the queue per backend, progress over SSE, cancel, crash, CLI.

Everything runs for real: the Temporal dev server, the worker, the API over HTTP and the
scripted Ollama server's /api/pull, which streams real progress lines and adds the model only
when the client stayed to the end.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Replayer, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from api.main import create_app
from core.backends.downloads import cancel_downloads, enqueue_download
from core.devserver import free_port
from core.temporal import ensure_search_attributes
from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack
from worker import PASSTHROUGH
from workflows.download_types import DownloadOptions, PullInput, PullResult, download_workflow_id
from workflows.downloads import ModelDownloadWorkflow

ROOT = Path(__file__).parent.parent
FINAL = ("success", "failed", "cancelled", "unknown")
# The slower tests run on SQLite only; the queue lives in Temporal, not in the database.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def sse(
    http: httpx.Client, params: dict[str, str] | None = None, timeout: float = 30.0
) -> Iterator[dict[str, Any]]:
    """`event: status` payloads of /queue/inProgress, parsed the way a browser would."""
    deadline = time.monotonic() + timeout
    with http.stream(
        "GET", "/queue/inProgress", params=params, timeout=httpx.Timeout(10.0, read=20.0)
    ) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        name, data = "", []
        for line in resp.iter_lines():
            assert time.monotonic() < deadline, "the stream did not deliver in time"
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:
                assert name == "status"
                yield json.loads("\n".join(data))
                name, data = "", []


def follow(http: httpx.Client, job_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every event of one job until it ends (the `job` filter closes the stream then)."""
    events = list(sse(http, {"job": job_id}, timeout))
    assert events and events[-1]["status"] in FINAL, events
    return events


def pulls(llm: ScriptedLLM, model: str | None = None) -> list[Any]:
    return [
        r
        for r in list(llm.requests)
        if r.path == "/api/pull" and (model is None or r.model == model)
    ]


def add_backend(http: httpx.Client, llm: ScriptedLLM, name: str = "local") -> str:
    resp = http.post("/backends", json={"name": name, "baseUrl": llm.url, "type": "ollama"})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def enqueue(http: httpx.Client, model: str, backend: str = "local") -> dict[str, Any]:
    resp = http.post("/queue", json={"model": model, "backend": backend})
    assert resp.status_code == 201, resp.text
    job: dict[str, Any] = resp.json()
    return job


def queue_of(http: httpx.Client) -> list[dict[str, Any]]:
    resp = http.get("/queue")
    assert resp.status_code == 200, resp.text
    jobs: list[dict[str, Any]] = resp.json()
    return jobs


@pytest.fixture
def pulling(clean_stack: Stack, llm: ScriptedLLM) -> Iterator[Stack]:
    """The clean stack; afterwards no download of this test is left running, and the scripted
    server's pull knobs (which reset() keeps) are back to their defaults."""
    yield clean_stack
    resp = clean_stack.http.delete("/queue/cancel", params={"url": llm.url})
    assert resp.status_code in (200, 404), resp.text
    if resp.status_code == 200:
        wait_for(lambda: not queue_of(clean_stack.http), 15, "the queues to drain")
    llm.pull_total_bytes, llm.pull_seconds, llm.pull_steps = 100_000_000, 0.5, 10
    llm.unpullable.clear()


def test_declaring_a_model_downloads_it_where_missing(pulling: Stack, llm: ScriptedLLM) -> None:
    http = pulling.http
    add_backend(http, llm)
    resp = http.post(
        "/backends", json={"name": "hosted", "baseUrl": llm.openai_base, "type": "openai"}
    )
    assert resp.status_code == 201
    resp = http.post("/models", json={"model": "qwen2.5:0.5b", "canChat": True})
    assert resp.status_code == 201, resp.text
    # POST /models answers once the download is queued, so the queue already shows it.
    jobs = queue_of(http)
    assert [j["modelJob"]["model"] for j in jobs] in ([], ["qwen2.5:0.5b"])
    wait_for(lambda: llm.has_model("qwen2.5:0.5b"), 20, "the declared model to be pulled")
    wait_for(lambda: not queue_of(http), 10, "the queue to empty")
    # A model the backend already has is not pulled again; the openai backend never pulls.
    assert http.post("/models", json={"model": "llama3.2"}).status_code == 201
    time.sleep(0.5)
    assert [r.model for r in pulls(llm)] == ["qwen2.5:0.5b"]


@SQLITE_ONLY
def test_in_progress_streams_growing_progress_then_success(
    pulling: Stack, llm: ScriptedLLM
) -> None:
    llm.pull_seconds, llm.pull_steps = 4.0, 8
    http = pulling.http
    add_backend(http, llm)
    job = enqueue(http, "phi3:mini")
    assert job["status"] in ("queued", "downloading")
    assert job["taskType"] == "model_download"
    assert job["modelJob"] == {"model": "phi3:mini", "url": llm.url}
    events: list[dict[str, Any]] = []
    for event in sse(http, timeout=30):
        events.append(event)
        if event["status"] in FINAL:
            break
    assert events[-1]["status"] == "success", events
    progress = [e for e in events[:-1] if e["completed"]]
    completed = [e["completed"] for e in progress]
    assert len(set(completed)) >= 2, events
    assert completed == sorted(completed), completed
    first = progress[0]
    assert first["model"] == "phi3:mini"
    assert first["baseUrl"] == llm.url
    assert first["backend"] == "local"
    assert first["total"] == llm.pull_total_bytes
    assert first["digest"].startswith("sha256:")
    assert llm.has_model("phi3:mini")


@SQLITE_ONLY
def test_cancel_running_and_queued_downloads(pulling: Stack, llm: ScriptedLLM) -> None:
    llm.pull_seconds, llm.pull_steps = 20.0, 40
    http = pulling.http
    add_backend(http, llm)
    assert http.post("/models", json={"model": "big-a"}).status_code == 201
    b = enqueue(http, "big-b")
    c = enqueue(http, "big-c")
    assert b["status"] == c["status"] == "queued"

    def downloading(model: str) -> list[dict[str, Any]]:
        jobs = queue_of(http)
        if jobs and jobs[0]["modelJob"]["model"] == model and jobs[0]["progress"]["completed"]:
            return jobs
        return []

    jobs = wait_for(lambda: downloading("big-a"), 15, "big-a to make progress")
    assert [(j["modelJob"]["model"], j["status"]) for j in jobs] == [
        ("big-a", "downloading"),
        ("big-b", "queued"),
        ("big-c", "queued"),
    ]
    for job in jobs:
        assert set(job) >= {"id", "taskType", "modelJob", "scheduledFor", "validUntil"}
        assert job["createdAt"].endswith("Z") and job["scheduledFor"] > 0
        assert job["backend"] == "local"
    a_id = jobs[0]["id"]

    assert http.delete("/queue/cancel").status_code == 422
    assert http.delete("/queue/big-b").status_code == 200  # queued: just dropped
    assert [j["modelJob"]["model"] for j in queue_of(http)] == ["big-a", "big-c"]
    resp = http.delete("/queue/cancel", params={"model": "big-a"})  # running: stopped
    assert resp.status_code == 200, resp.text
    assert follow(http, a_id)[-1]["status"] == "cancelled"
    wait_for(lambda: downloading("big-c"), 15, "big-c to start once big-a stopped")
    model_c = http.post("/models", json={"model": "big-c"}).json()  # queued already: no-op
    resp = http.delete(f"/models/{model_c['id']}", params={"purge": "true"})
    assert resp.status_code == 200, resp.text
    assert follow(http, c["id"])[-1]["status"] == "cancelled"
    assert follow(http, b["id"])[-1]["status"] == "cancelled"
    assert queue_of(http) == []
    time.sleep(1.0)
    assert not any(llm.has_model(m) for m in ("big-a", "big-b", "big-c"))
    assert [r.model for r in pulls(llm)] == ["big-a", "big-c"]


@SQLITE_ONLY
def test_one_pull_per_model_and_one_at_a_time(pulling: Stack, llm: ScriptedLLM) -> None:
    llm.pull_seconds, llm.pull_steps = 1.5, 3
    http = pulling.http
    add_backend(http, llm)
    first = enqueue(http, "mistral:7b")
    again = enqueue(http, "mistral:7b")
    assert again["id"] == first["id"]
    assert http.post("/models", json={"model": "mistral:7b"}).status_code == 201
    enqueue(http, "gemma2:2b")
    wait_for(lambda: llm.has_model("mistral:7b") and llm.has_model("gemma2:2b"), 20, "both pulls")
    requests = pulls(llm)
    assert [r.model for r in requests] == ["mistral:7b", "gemma2:2b"]
    # The second pull starts only after the first one's 1.5 s of streaming ended.
    assert requests[1].time - requests[0].time >= 1.4


@SQLITE_ONLY
def test_unknown_model_fails_with_a_clear_error(pulling: Stack, llm: ScriptedLLM) -> None:
    llm.unpullable.add("no-such-model")
    http = pulling.http
    add_backend(http, llm)
    job = enqueue(http, "no-such-model")
    final = follow(http, job["id"])[-1]
    assert final["status"] == "failed"
    assert "file does not exist" in final["error"]
    assert "no-such-model" in final["error"]
    # Not retried: it can never succeed.
    assert len(pulls(llm, "no-such-model")) == 1
    resp = http.post(
        "/backends", json={"name": "hosted", "baseUrl": llm.openai_base, "type": "openai"}
    )
    assert resp.status_code == 201
    assert http.post("/queue", json={"model": "x", "backend": "hosted"}).status_code == 422
    assert http.post("/queue", json={"model": "x", "backend": "nope"}).status_code == 404


async def test_queue_dedupes_runs_one_at_a_time_and_continues_as_new(
    temporal_address: str,
) -> None:
    """The workflow alone, with the pull mocked by name: FIFO, dedupe, one pull at a time,
    continue-as-new carrying the queue, and a history that replays."""
    client = await Client.connect(temporal_address)
    await ensure_search_attributes(client)
    task_queue = f"downloads-{os.urandom(4).hex()}"
    backend_id = f"backend-{os.urandom(4).hex()}"
    calls: list[str] = []
    running = peak = 0

    @activity.defn(name="ollama_pull")
    async def fake_pull(req: PullInput) -> PullResult:
        nonlocal running, peak
        calls.append(req.model)
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return PullResult(model=req.model, status="success", digest="sha256:x", total=9)

    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
    )
    options = DownloadOptions(jobs_per_run=2, idle_seconds=1.0)
    handle = client.get_workflow_handle(download_workflow_id(backend_id))
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[ModelDownloadWorkflow],
        activities=[fake_pull],
        workflow_runner=runner,
    ):
        for model in ("a", "b", "a", "c", "d", "e:latest", "e", "b"):
            await enqueue_download(client, task_queue, "t1", backend_id, model, options=options)
        result = await asyncio.wait_for(handle.result(), 30)  # follows continue-as-new
    assert calls == ["a", "b", "c", "d", "e:latest"]
    assert peak == 1
    assert [(j["model"], j["status"]) for j in result["finished"]] == [
        (m, "success") for m in calls
    ]
    assert result["pending"] == [] and result["inProgress"] is None
    desc = await handle.describe()
    assert desc.raw_description.workflow_execution_info.first_run_id != desc.run_id
    # Cancelling every queue of a tenant finds them through visibility: none runs any more.
    assert await cancel_downloads(client, "t1", None) == 0
    replayer = Replayer(workflows=[ModelDownloadWorkflow], workflow_runner=runner)
    await replayer.replay_workflow(await handle.fetch_history())


def chainloom(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@SQLITE_ONLY
def test_cli_models_pull_shows_progress(pulling: Stack, llm: ScriptedLLM) -> None:
    llm.pull_seconds, llm.pull_steps = 2.5, 5
    llm.unpullable.add("ghost")
    add_backend(pulling.http, llm)
    env = {"CHAINLOOM_API_URL": pulling.api.url, "CHAINLOOM_API_KEY": Stack.API_KEY}
    result = chainloom("models", "pull", "tinyllama", "--backend", "local", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pulling " in result.stdout  # the progress bar of the blob
    assert "MB" in result.stdout
    assert "pulled tinyllama on local" in result.stdout
    assert llm.has_model("tinyllama")
    result = chainloom("models", "pull", "ghost", "--backend", "local", env=env)
    assert result.returncode == 1
    assert "failed" in result.stderr and "file does not exist" in result.stderr


def test_declaring_a_model_without_temporal_still_answers(tmp_path: Path, llm: ScriptedLLM) -> None:
    settings = Stack.settings_for(
        f"127.0.0.1:{free_port()}", f"sqlite:///{tmp_path / 'no-temporal.db'}"
    )
    with TestClient(create_app(settings), headers={"X-API-Key": settings.api_key}) as http:
        resp = http.post("/backends", json={"name": "o", "baseUrl": llm.url, "type": "ollama"})
        assert resp.status_code == 201
        started = time.monotonic()
        resp = http.post("/models", json={"model": "qwen2.5:0.5b"})
        assert resp.status_code == 201, resp.text
        assert time.monotonic() - started < 6
        assert http.get("/queue").status_code == 503


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_sigkill_mid_pull_resumes_on_a_new_worker(
    temporal_address: str, tmp_path: Path, llm: ScriptedLLM
) -> None:
    settings = Stack.settings_for(temporal_address, f"sqlite:///{tmp_path / 'crash.db'}")
    env = {**os.environ, **Stack.env_for(settings)}
    api = ApiThread(settings).start()
    http = httpx.Client(base_url=api.url, headers={"X-API-Key": settings.api_key}, timeout=60)
    llm.pull_seconds, llm.pull_steps = 4.0, 16
    first = start_worker(env)
    second: subprocess.Popen[bytes] | None = None
    try:
        add_backend(http, llm)
        job = enqueue(http, "llava:7b")

        def progressed() -> bool:
            assert first.poll() is None, "the worker died on its own"
            jobs = queue_of(http)
            return bool(jobs and (jobs[0].get("progress") or {}).get("completed"))

        wait_for(progressed, 30, "the pull to make progress")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_worker(env)
        events = follow(http, job["id"], timeout=60)
        assert events[-1]["status"] == "success", events
        assert llm.has_model("llava:7b")
        # The killed attempt's stream was dropped (nothing added); the new worker pulled again.
        assert len(pulls(llm, "llava:7b")) == 2
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        http.close()
        api.stop()
        llm.pull_seconds, llm.pull_steps = 0.5, 10
