"""Soak: 8 concurrent 6-step chain runs while the worker (a subprocess) is SIGKILLed 6 times,
a new worker started after each kill (benchmarks/recovery.py does the work).

Asserts that every run completes with the output its prompts predict and that no model call
is repeated without a kill between the two requests (so at most once per kill: a heartbeat
timeout firing on a live worker would show as a repeat with no kill). Prints, per kill, the
seconds from the new worker's start to the next model call; times are not asserted (noisy
machines). About a minute on 2 idle cores; `python -m benchmarks.recovery` prints the same
table, and `--ladder` what each setting contributes (docs/benchmarks.md).
"""

from pathlib import Path

import pytest

from benchmarks.recovery import soak


@pytest.mark.slow
@pytest.mark.soak
def test_runs_survive_six_worker_kills_and_move_again_in_seconds(
    temporal_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = soak(temporal_address, tmp_path, runs=8, steps=6, kills=6, delay=2.0)
    with capsys.disabled():
        print("\nrecovery after a worker crash (seconds from the new worker's start):")
        print(result.table())
        print(f"the last worker exited with {result.last_worker_exit} on SIGTERM")
    assert len(result.kills) == 6
    assert all(kill.in_flight for kill in result.kills), "a kill found no run in flight"
    assert result.wrong_outputs() == []
    assert result.unexplained_repeats() == []
    # Each kill repeats at most the calls in flight: one per run.
    assert result.repeats() <= sum(len(kill.in_flight) for kill in result.kills)
