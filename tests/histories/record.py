"""Record the histories that `tests/test_histories.py` replays: one or more real runs of every
workflow type, made by the current code against a Temporal dev server, the scripted LLM and
the hook service.

Run it on purpose, when a workflow's decisions change *and* the change is behind
`workflow.patched` (docs/workflows.md): `make histories`. The files it writes are committed;
old ones stay, so the suite keeps proving that histories made by earlier code still replay.

    python -m tests.histories.record [--out tests/histories] [--tag TAG]
"""

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio.client import Client

from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process
from core.temporal import connect
from tests.hook_service import HookService, add_llm_backend, allowlisted_stack, register
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack
from workflows.download_types import DownloadOptions

HERE = Path(__file__).parent

TOOL_CHAIN = {
    "id": "history-tool-loop",
    "description": "A tool loop over a remote hook and a JS function, then an approval.",
    "tasks": [
        {
            "id": "chat",
            "handler": "chat_completion",
            "system_instruction": "You answer weather questions; use the tools.",
            "execute_config": {"model": "gpt-4o-mini", "hooks": ["weather", "js"]},
            "transition": {
                "branches": [
                    {"operator": "equals", "when": "tool-call", "goto": "tools"},
                    {"operator": "default", "goto": "review"},
                ]
            },
        },
        {
            "id": "tools",
            "handler": "execute_tool_calls",
            "transition": {"branches": [{"operator": "default", "goto": "chat"}]},
        },
        {
            "id": "review",
            "handler": "approval",
            "timeout": "10m",
            "transition": {
                "branches": [
                    {"operator": "equals", "when": "approved", "goto": "shout"},
                    {"operator": "default", "goto": "end"},
                ]
            },
        },
        {
            "id": "shout",
            "handler": "js",
            "hook": {"name": "shout"},
            "input_var": "input",
            "transition": {"branches": [{"operator": "default", "goto": "score"}]},
        },
        {
            "id": "score",
            "handler": "prompt_to_int",
            "prompt_template": "Score this answer from 1 to 10: {{ chat }}",
            "execute_config": {"model": "gpt-4o-mini"},
            "transition": {"branches": [{"operator": "default", "goto": "end"}]},
        },
    ],
}

SHOUT = "function main(input) { return String(JSON.stringify(input)).toUpperCase(); }"
GREETER = (
    "function main(event) {"
    " sendEvent('history.reply', {to: event.data.name, text: 'pong'});"
    " return {greeted: event.data.name}; }"
)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.1)


def last_is_tool(_: str, body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    return bool(messages) and messages[-1].get("role") == "tool"


def chain_with_tools_and_approval(stack: Stack, llm: ScriptedLLM, hooks: HookService) -> str:
    add_llm_backend(stack, llm.openai_base)
    register(stack, hooks)
    resp = stack.http.post(
        "/functions", json={"name": "shout", "description": "Shouts.", "script": SHOUT}
    )
    assert resp.status_code == 201, resp.text
    llm.reply("Score this answer", "8")
    llm.reply(last_is_tool, "It is 21 degrees and sunny in Paris.")
    llm.reply(
        "weather",
        tool_calls=[
            {"name": "weather__get_weather", "arguments": {"city": "Paris"}},
            {"name": "js__shout", "arguments": {"text": "sunny"}},
        ],
    )
    run = stack.http.post(
        "/runs", json={"chain": TOOL_CHAIN, "input": "What is the weather in Paris?"}
    )
    assert run.status_code == 202, run.text
    run_id = run.json()["id"]

    def waiting() -> bool:
        return bool(stack.http.get(f"/runs/{run_id}").json()["status"] == "waiting")

    wait_for(waiting, "the approval task")
    resp = stack.http.post(f"/runs/{run_id}/approve", json={"approved": True, "comment": "ok"})
    assert resp.status_code == 200, resp.text

    def finished() -> dict[str, Any] | None:
        view: dict[str, Any] = stack.http.get(f"/runs/{run_id}").json()
        return view if view["status"] in ("completed", "failed", "cancelled") else None

    view = wait_for(finished, "the chain to finish")
    assert view["status"] == "completed", view
    return str(view["workflowId"])


def function_from_a_trigger(stack: Stack) -> str:
    resp = stack.http.post(
        "/functions", json={"name": "greeter", "description": "Greets.", "script": GREETER}
    )
    assert resp.status_code == 201, resp.text
    body = {
        "name": "on-history-ping",
        "listenFor": {"type": "history.ping"},
        "type": "function",
        "function": "greeter",
    }
    resp = stack.http.post("/event-triggers", json=body)
    assert resp.status_code == 201, resp.text
    resp = stack.http.post("/events", json={"event_type": "history.ping", "data": {"name": "ada"}})
    assert resp.status_code == 201, resp.text

    def replied() -> bool:
        found = stack.http.get("/events/type", params={"event_type": "history.reply"}).json()
        return bool(found)

    wait_for(replied, "the function's reply event")
    return ""  # found by type below


async def download(client: Client, stack: Stack, llm: ScriptedLLM) -> str:
    from core.backends.downloads import enqueue_download
    from workflows.download_types import download_workflow_id

    resp = stack.http.post(
        "/backends", json={"name": "ollama", "baseUrl": llm.url, "type": "ollama"}
    )
    assert resp.status_code == 201, resp.text
    backend_id = resp.json()["id"]
    options = DownloadOptions(idle_seconds=1.0)
    await enqueue_download(
        client,
        stack.settings.task_queue,
        stack.settings.default_tenant,
        backend_id,
        "qwen2.5:0.5b",
        options=options,
        backend_name="ollama",
    )
    workflow_id = download_workflow_id(backend_id)
    await client.get_workflow_handle(workflow_id).result()
    return workflow_id


async def state_sync(client: Client, stack: Stack) -> str:
    workflow_id = f"history-state-sync-{int(time.time())}"
    await client.execute_workflow(
        "StateSyncWorkflow", id=workflow_id, task_queue=stack.settings.task_queue
    )
    return workflow_id


async def latest_of_type(client: Client, workflow_type: str) -> str:
    async for execution in client.list_workflows(f"WorkflowType = '{workflow_type}'"):
        return str(execution.id)
    raise LookupError(f"no {workflow_type} run found")


async def save(client: Client, workflow_id: str, path: Path) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    data = json.loads(history.to_json())
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    await asyncio.to_thread(path.write_text, text)
    print(f"wrote {path} ({len(data['events'])} events)")


async def record(out: Path, tag: str) -> None:
    port = free_port()
    server = start_dev_server(None, port)
    llm = ScriptedLLM(models=["gpt-4o-mini", "qwen2.5:0.5b"]).start()
    llm.pull_seconds = 0.3
    hooks = HookService().start()
    with tempfile.TemporaryDirectory(prefix="chainloom-histories-") as tmp:
        database_url = f"sqlite:///{Path(tmp) / 'histories.db'}"
        Database(database_url).migrate()
        address = f"127.0.0.1:{port}"
        stack = allowlisted_stack(address, database_url)
        try:
            client = await connect(stack.settings)
            chain_id = await asyncio.to_thread(chain_with_tools_and_approval, stack, llm, hooks)
            await save(client, chain_id, out / f"chain_tools_approval.{tag}.json")
            await asyncio.to_thread(function_from_a_trigger, stack)
            function_id = await latest_of_type(client, "FunctionWorkflow")
            await save(client, function_id, out / f"function_trigger.{tag}.json")
            download_id = await download(client, stack, llm)
            await save(client, download_id, out / f"download.{tag}.json")
            sync_id = await state_sync(client, stack)
            await save(client, sync_id, out / f"state_sync.{tag}.json")
        finally:
            stack.close()
            hooks.stop()
            llm.stop()
            stop_process(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--tag", default=time.strftime("%Y%m%d"), help="file name suffix")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(record(args.out, args.tag))


if __name__ == "__main__":
    main()
