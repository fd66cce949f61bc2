"""The `chainloom` command as a user runs it: lint, chains run, and the dev stack."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.devserver import free_port
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack, dev_command

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "chains" / "examples"


def chainloom(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_lint_accepts_the_examples() -> None:
    result = chainloom("chains", "lint", *map(str, sorted(EXAMPLES.iterdir())))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == len(list(EXAMPLES.iterdir()))


def test_lint_names_the_problem_and_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "id: broken\ntasks:\n  - id: a\n    handler: noop\n"
        "    transition:\n      branches:\n        - operator: default\n          goto: nowhere\n"
    )
    result = chainloom("chains", "lint", str(broken))
    assert result.returncode == 1
    assert "/tasks/0/transition/branches/0/goto" in result.stdout
    assert "nowhere" in result.stdout


def test_chains_run_shows_each_task_then_the_output(clean_stack: Stack, llm: ScriptedLLM) -> None:
    resp = clean_stack.http.post(
        "/backends", json={"name": "scripted", "baseUrl": llm.openai_base, "type": "openai"}
    )
    assert resp.status_code == 201
    llm.reply("sentiment", "negative")
    llm.reply("apology", "We are sorry it broke; a replacement is on its way.")
    result = chainloom(
        "chains",
        "run",
        str(EXAMPLES / "sentiment-router.yaml"),
        "--input",
        "It broke after a day",
        env={"CHAINLOOM_API_URL": clean_stack.api.url, "CHAINLOOM_API_KEY": Stack.API_KEY},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "classify" in out and "apologize" in out
    assert out.index("classify") < out.index("apologize")
    assert "a replacement is on its way" in out


@pytest.mark.slow
def test_dev_serves_health_ui_and_api_then_stops_on_sigterm(tmp_path: Path) -> None:
    port, temporal_port, ui_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CHAINLOOM_API_KEY")}
    proc = subprocess.Popen(
        dev_command(port, temporal_port, ui_port, tmp_path / "data"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        started = time.monotonic()
        key = ""
        seen: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "API key" in line:
                key = line.split()[-1]
                break
        log = tmp_path / "data" / "temporal.log"
        assert key, "".join(seen) + (log.read_text() if log.exists() else "")
        assert time.monotonic() - started < 60
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
        assert httpx.get(f"{base}/taskchains").status_code == 401
        assert httpx.get(f"{base}/taskchains", headers={"X-API-Key": key}).status_code == 200
        ui = httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=30)
        assert ui.status_code == 200
        assert (tmp_path / "data" / "api_key").read_text().strip() == key
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    for p in (port, temporal_port, ui_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/", timeout=2)
