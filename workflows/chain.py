"""ChainWorkflow: interprets a task chain step by step.

Only model calls, hooks, JS and stored values leave the workflow as activities; templating,
parsing, conditions and transitions run here, deterministically, so they cost no round trip
and replay for free. The step loop and the handlers live in workflows/chain_run.py (and
chain_tools.py): this module, which the sandbox executes again for every run, holds only
the workflow's entry points.
"""

from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.chain_run import ChainRun
    from workflows.contracts import APPROVE_UPDATE, CHAIN_WORKFLOW, PROGRESS_QUERY
    from workflows.types import ApprovalAccepted, ApprovalDecision, ChainRunInput


@workflow.defn(name=CHAIN_WORKFLOW)
class ChainWorkflow(ChainRun):
    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> dict[str, Any]:
        return {
            "status": self._status,
            "currentTask": self._current,
            "state": self._state,
            "output": self._output,
            **self._stored(),
        }

    # Kept for replay only: histories recorded before APPROVAL_UPDATE carry this signal. The API
    # no longer sends it, and runs past that patch ignore it (an early signal used to approve
    # the next approval task in advance).
    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        self._decisions.append(decision)

    @workflow.update(name=APPROVE_UPDATE)
    def decide(self, decision: ApprovalDecision) -> ApprovalAccepted:
        if self._awaiting is None or self._answer is not None:
            # Two decisions validated in one workflow task: the first one won.
            raise self._not_waiting()
        self._answer = decision
        return ApprovalAccepted(
            task_id=self._awaiting,
            approved=decision.approved,
            comment=decision.comment,
            payload=decision.payload,
            by=decision.by,
        )

    @decide.validator
    def _waiting_for_decision(self, decision: ApprovalDecision) -> None:
        # A refused update leaves no trace in the history: nothing is kept for a later task.
        if self._awaiting is None or self._answer is not None:
            raise self._not_waiting()

    @workflow.run
    async def run(self, params: ChainRunInput) -> dict[str, Any]:
        return await self._run_chain(params)
