"""SIGKILL the worker process in the middle of a 5-step chain: nothing is lost, no paid call
is repeated except the one that was in flight."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack

ROOT = Path(__file__).parent.parent

CHAIN = {
    "id": "five-steps",
    "tasks": [
        {
            "id": f"step{i}",
            "handler": "prompt_to_string",
            "prompt_template": f"step {i} of five: {{{{ previous_output }}}}",
            "execute_config": {"model": "gpt-4o-mini"},
            "transition": {"branches": [{"operator": "default", "goto": f"step{i + 1}"}]}
            if i < 5
            else {},
        }
        for i in range(1, 6)
    ],
}


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def slow_llm() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM(models=["gpt-4o-mini"]).start()
    server.reply(None, "done", delay=1.0)
    yield server
    server.stop()


@pytest.mark.slow
def test_sigkill_mid_chain_loses_nothing(
    temporal_address: str, tmp_path: Path, slow_llm: ScriptedLLM
) -> None:
    database_url = f"sqlite:///{tmp_path / 'crash.db'}"
    settings = Stack.settings_for(temporal_address, database_url, CHAINLOOM_LLM_HEARTBEAT_TIMEOUT=2)
    env = {**os.environ, **Stack.env_for(settings)}
    api = ApiThread(settings).start()
    http = httpx.Client(base_url=api.url, headers={"X-API-Key": settings.api_key}, timeout=60)
    first = start_worker(env)
    second: subprocess.Popen[bytes] | None = None
    try:
        resp = http.post(
            "/backends",
            json={"name": "slow", "baseUrl": slow_llm.openai_base, "type": "openai"},
        )
        assert resp.status_code == 201, resp.text
        run = http.post("/runs", json={"chain": CHAIN, "input": "go"}).json()
        deadline = time.monotonic() + 60
        while slow_llm.count("/v1/chat/completions") < 3:
            assert time.monotonic() < deadline, "the chain never reached step 3"
            assert first.poll() is None, "the worker died on its own"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_worker(env)
        deadline = time.monotonic() + 90
        while True:
            view = http.get(f"/runs/{run['id']}").json()
            if view["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"run did not finish: {view}"
            time.sleep(0.25)
        assert view["status"] == "completed", view
        assert [u["taskID"] for u in view["state"]] == [f"step{i}" for i in range(1, 6)]
        prompts = [
            r.body["messages"][-1]["content"]
            for r in slow_llm.requests
            if r.path == "/v1/chat/completions"
        ]
        # At most the call that was in flight (step 3) is made twice.
        assert len(prompts) <= 6, prompts
        for step in (1, 2, 4, 5):
            assert sum(p.startswith(f"step {step} ") for p in prompts) == 1, prompts
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        http.close()
        api.stop()
