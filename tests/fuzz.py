"""Schemathesis over the whole OpenAPI document of a running chainloom stack.

`make fuzz` runs this module: it starts a Temporal dev server and, per database, a worker and
the API on loopback, then fuzzes every operation the document lists when it runs (no route
list here, so new routes are covered as soon as they are mounted). tests/test_fuzz.py runs the
same thing with few examples, on a stack of its own per database.

Checks: `not_a_server_error` and `response_schema_conformance`. `status_code_conformance` is
left off on purpose: FastAPI documents only 2xx and 422, so it would flag every 401/403/404/409
our error model answers by design, drowning the real findings.
"""

import argparse
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from schemathesis.engine import events
from schemathesis.engine.recorder import ScenarioRecorder

CHECKS = ("not_a_server_error", "response_schema_conformance")

# Event streams (operations answering text/event-stream) never end by themselves: schemathesis
# reads them until the request timeout passes in total (or this many events arrive), so they
# are fuzzed with a short timeout.
STREAM_TIMEOUT = 1.0
MAX_STREAM_EVENTS = 3
REQUEST_TIMEOUT = 30.0
# CPython 3.11 bug (gh-106905): the AST recursion-depth check is not thread-safe, so
# schemathesis compiling code while another thread of this process does (the worker's
# Temporal sandbox, the API) may raise this SystemError. A fault of the interpreter, not of
# the API: reported as a warning, the operation's other phases still count.
AST_RACE = "AST constructor recursion depth mismatch"


@dataclass
class Finding:
    operation: str
    check: str
    title: str
    message: str
    curl: str

    def render(self) -> str:
        return f"{self.operation}: [{self.check}] {self.title}\n  {self.message}\n  {self.curl}"


@dataclass
class Report:
    operations: set[str] = field(default_factory=set)
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    findings: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.server_errors and not self.findings and not self.errors

    def record(self, recorder: ScenarioRecorder) -> None:
        self.operations.add(recorder.label)
        for interaction in recorder.interactions.values():
            if interaction.response is None:
                continue
            self.requests += 1
            self.statuses[interaction.response.status_code] += 1
            if interaction.response.status_code >= 500:
                self.server_errors += 1
        for checks in recorder.checks.values():
            for check in checks:
                info = check.failure_info
                if info is None:
                    continue
                failure = info.failure
                # One line per distinct failure, not per example that hit it.
                key = (recorder.label, check.name, failure.title)
                self.findings.setdefault(
                    key,
                    Finding(
                        recorder.label, check.name, failure.title, failure.message, info.code_sample
                    ),
                )

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        lines = [
            f"operations: {len(self.operations)}  requests: {self.requests}  "
            f"server errors: {self.server_errors}  distinct failures: {len(self.findings)}  "
            f"time: {self.elapsed:.0f}s",
            f"statuses: {statuses}",
        ]
        lines += [finding.render() for finding in self.findings.values()]
        lines += [f"error: {error}" for error in self.errors]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def stream_paths(doc: dict[str, Any]) -> list[str]:
    return sorted(
        path
        for path, operations in doc.get("paths", {}).items()
        for operation in operations.values()
        if isinstance(operation, dict)
        for response in operation.get("responses", {}).values()
        if "text/event-stream" in response.get("content", {})
    )


def config(
    doc: dict[str, Any],
    base_url: str,
    api_key: str,
    max_examples: int,
    seed: int | None,
    workers: int,
    coverage: bool,
) -> Any:
    data: dict[str, Any] = {
        "base-url": base_url,
        "headers": {"X-API-Key": api_key},
        "request-timeout": REQUEST_TIMEOUT,
        "max-stream-events": MAX_STREAM_EVENTS,
        # Findings are reported, not stopped at: one run should list them all.
        "continue-on-failure": True,
        # Most of a request's time is spent waiting on the database or Temporal.
        "workers": workers,
        "generation": {"max-examples": max_examples},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        # No links in the document, so the stateful phase would only add time. The coverage
        # phase (boundary and invalid values for every parameter) ignores max-examples and
        # is the slow one; the in-suite run leaves it to `make fuzz`.
        "phases": {"stateful": {"enabled": False}, "coverage": {"enabled": coverage}},
    }
    streams = stream_paths(doc)
    if streams:
        regex = "^(" + "|".join(re.escape(path) for path in streams) + ")$"
        data["operations"] = [{"include-path-regex": regex, "request-timeout": STREAM_TIMEOUT}]
    if seed is not None:
        data["seed"] = seed
    return schemathesis.Config.from_dict(data)


def fuzz(
    base_url: str,
    api_key: str,
    *,
    max_examples: int,
    seed: int | None = None,
    workers: int = 1,
    coverage: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Fuzz every operation of the API at `base_url`; never raises for findings."""
    started = time.monotonic()
    response = httpx.get(f"{base_url}/openapi.json", headers={"X-API-Key": api_key}, timeout=30)
    response.raise_for_status()
    doc = response.json()
    options = config(doc, base_url, api_key, max_examples, seed, workers, coverage)
    schema = schemathesis.openapi.from_dict(doc, config=options)
    report = Report()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished) and event.is_test_scenario:
            report.record(event.recorder)
            if progress is not None:
                progress(
                    f"{event.phase.value:>9} {event.status.value:<8} "
                    f"{event.elapsed_time:6.1f}s {event.label}"
                )
        elif isinstance(event, events.NonFatalError):
            message = f"{event.label}: {event.info.message}"
            harness = isinstance(event.value, SystemError) and AST_RACE in str(event.value)
            (report.warnings if harness else report.errors).append(message)
        elif isinstance(event, events.FatalError):
            report.errors.append(f"fatal: {event.exception!r}")
    report.elapsed = time.monotonic() - started
    return report


PG_ADMIN = os.environ.get("FUZZ_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_database(kind: str, pg_admin: str = PG_ADMIN) -> Iterator[str]:
    """A new empty database: "sqlite" (a temporary file), "postgres" (created on `pg_admin`
    and dropped afterwards) or a database URL, used as it is."""
    if kind == "sqlite":
        yield f"sqlite:///{Path(tempfile.mkdtemp(prefix='chainloom-fuzz-')) / 'fuzz.db'}"
        return
    if kind != "postgres":
        yield kind
        return
    import psycopg

    name = "chainloom_fuzz_" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        server = pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
        yield f"postgresql+psycopg://{server}/{name}"
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fuzz_stack(
    temporal_address: str, database_url: str, max_examples: int, **options: Any
) -> Report:
    """A fresh stack on `database_url`, fuzzed and stopped."""
    from tests.stack import Stack

    # /tasks waits for the run it starts; a second shows that it started.
    stack = Stack(temporal_address, database_url, CHAINLOOM_TASKS_WAIT_TIMEOUT=1)
    try:
        return fuzz(stack.api.url, Stack.API_KEY, max_examples=max_examples, **options)
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=int(os.environ.get("FUZZ_EXAMPLES", 50)))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("FUZZ_WORKERS", 2)))
    parser.add_argument(
        "--database",
        action="append",
        default=[],
        help="sqlite, postgres (a fresh database on FUZZ_PG_ADMIN) or a database URL; "
        "repeatable. Default: DATABASE_URL when set, else sqlite and postgres",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every scenario")
    args = parser.parse_args(argv)

    from core.devserver import free_port, start_dev_server, stop_process

    env_url = os.environ.get("DATABASE_URL")
    databases = args.database or ([env_url] if env_url else ["sqlite", "postgres"])
    port = free_port()
    temporal = start_dev_server(None, port)
    failed = False
    try:
        for kind in databases:
            with fresh_database(kind) as url:
                label = url.split("://", 1)[0]
                print(f"== {label}: {args.examples} examples per operation", flush=True)
                report = fuzz_stack(
                    f"127.0.0.1:{port}",
                    url,
                    args.examples,
                    seed=args.seed,
                    workers=args.workers,
                    progress=(lambda line: print(line, flush=True)) if args.verbose else None,
                )
            print(f"== {label}: {report.summary()}", flush=True)
            failed = failed or not report.ok
    finally:
        stop_process(temporal)
    print("fuzz: FAILED" if failed else "fuzz: no server errors, no schema violations")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
