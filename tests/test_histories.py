"""Committed histories of every workflow type replay on the current code.

Workflows run for days: a worker started on new code must carry on the runs that older code
began. tests/histories/ holds real histories recorded by earlier versions (the file name says
which: `<scenario>.<tag>.json`); replaying them here fails the suite when a change to a
workflow's decisions was not put behind `workflow.patched` (docs/workflows.md).
"""

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from worker import PASSTHROUGH, WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
)


def load(path: Path) -> WorkflowHistory:
    data = json.loads(path.read_text())
    started = data["events"][0]["workflowExecutionStartedEventAttributes"]
    workflow_id = started.get("workflowId") or path.stem
    return WorkflowHistory.from_json(workflow_id, data)


def workflow_type(path: Path) -> str:
    data = json.loads(path.read_text())
    return str(data["events"][0]["workflowExecutionStartedEventAttributes"]["workflowType"]["name"])


@pytest.mark.parametrize("path", HISTORIES, ids=[p.name for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    replayer = Replayer(workflows=WORKFLOWS, workflow_runner=RUNNER)
    result = await replayer.replay_workflow(load(path), raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


def test_every_workflow_type_has_a_history() -> None:
    registered = {getattr(w, "__temporal_workflow_definition").name for w in WORKFLOWS}
    recorded = {workflow_type(p) for p in HISTORIES}
    assert registered <= recorded, f"no committed history for {sorted(registered - recorded)}"


async def test_a_changed_decision_fails_the_replay(tmp_path: Path) -> None:
    """The replay check can fail: a history whose activity was swapped for another is refused."""
    source = next(p for p in HISTORIES if workflow_type(p) == "StateSyncWorkflow")
    data = json.loads(source.read_text())
    for event in data["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs:
            attrs["activityType"]["name"] = "not_what_the_code_schedules"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    replayer = Replayer(workflows=WORKFLOWS, workflow_runner=RUNNER)
    result = await replayer.replay_workflow(load(broken), raise_on_replay_failure=False)
    assert result.replay_failure is not None
