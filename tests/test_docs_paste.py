"""Docs that paste: each shell block of README.md and docs/*.md runs against `chainloom dev`.

Each page's ```sh/```bash/```shell blocks run in order in one bash session, as a reader would
paste them into a terminal next to `make dev`. The only changes made to the commands are the
ones that move `make dev` to where this test started it: `localhost:8000` (and
`127.0.0.1:8000`) become the test's API port and `.chainloom` its data directory; the CLI's
own defaults for both (`CHAINLOOM_API_URL`, `CHAINLOOM_DATA_DIR`) point there too. A scripted
model server (tests/scripted_llm.py) listens where the docs put Ollama, localhost:11434.
`chainloom dev` runs with none of our CHAINLOOM_* settings, so its allowlists are the ones a
reader gets (CHAINLOOM_BACKEND_ALLOWLIST: loopback; CHAINLOOM_OUTBOUND_ALLOWLIST: empty).

A command fails the page when it exits non-zero, and every `curl` is checked for its HTTP
status: 4xx and 5xx fail the page (a JSON body sent without `Content-Type: application/json`
answers 422, the commonest way a pasted command breaks).

Blocks that must not run here (`make dev`, benchmarks, streams that never end) carry, on the
line before their fence, `<!-- not run by tests/test_docs_paste.py: <why> -->`. The skipped
blocks are listed, and there may only be a few of them.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.devserver import free_port
from tests.scripted_llm import ScriptedLLM
from tests.stack import dev_command

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell"}
SKIP_MARK = re.compile(r"^\s*<!--\s*not run by tests/test_docs_paste\.py:(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
# Skipping is for what cannot run in a test; more than this many means commands are hiding.
MAX_SKIPPED = 12
# Commands that start the whole system, run for minutes or never end: a block holding one
# must be marked, so that forgetting the mark says so here rather than hanging the run.
MUST_BE_MARKED = re.compile(
    r"^\s*(make\s+(dev|test|bench|fuzz|histories)\b|curl\b.*\s-N\b|(\S*/)?chainloom\s+dev\b)",
    re.MULTILINE,
)
# Where the docs put a local Ollama (README, backends.md, downloads.md).
OLLAMA_PORT = 11434
# Models the docs' examples name, all served by the scripted model server.
MODELS = ["llama3.2", "nomic-embed-text", "gpt-4o-mini", "qwen2.5:0.5b"]
PAGE_TIMEOUT = 180


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    skip: str | None  # the reason given in the marker, None when the block runs

    @property
    def where(self) -> str:
        return f"{shown(self.page)}:{self.line}"


def shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of a page, shell or not, with the skip reason marked before it."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        mark = SKIP_MARK.match(lines[start - 1]) if start > 0 else None
        skip = mark.group(1).strip() if mark else None
        found.append(Block(page, start + 1, language.lower(), "\n".join(body) + "\n", skip))
    return found


def shell_blocks(page: Path) -> list[Block]:
    return [b for b in blocks_of(page) if b.language in SHELL_LANGUAGES]


def stray_marks(page: Path) -> list[str]:
    """Skip markers that are not on the line right before a shell block's fence."""
    lines = page.read_text().splitlines()
    marked = {b.line - 1 for b in shell_blocks(page) if b.skip is not None}
    return [
        f"{shown(page)}:{n}"
        for n, line in enumerate(lines, 1)
        if SKIP_MARK.match(line) and n not in marked
    ]


def test_skipped_blocks_are_marked_with_a_reason_and_few() -> None:
    blocks = [b for page in PAGES for b in shell_blocks(page)]
    skipped = [b for b in blocks if b.skip is not None]
    listing = "\n".join(f"  {b.where}: {b.skip}" for b in skipped)
    print(f"\nshell blocks not run by tests/test_docs_paste.py ({len(skipped)}):\n{listing}")
    assert len(blocks) - len(skipped) >= 10, "hardly any shell block runs: is the parser broken?"
    assert all(b.skip for b in skipped), f"a skip marker without a reason:\n{listing}"
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} blocks skipped:\n{listing}"
    assert not [m for page in PAGES for m in stray_marks(page)], (
        "skip markers that do not sit right before a ```sh/```bash/```shell fence: "
        f"{[m for page in PAGES for m in stray_marks(page)]}"
    )
    unmarked = [b.where for b in blocks if b.skip is None and MUST_BE_MARKED.search(b.text)]
    assert not unmarked, (
        f"blocks that start the system, run for minutes or never end, but are not marked: "
        f"{unmarked}"
    )


def test_the_parser_reads_fences_markers_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            text
            ```sh
            echo one
            ```
            <!-- not run by tests/test_docs_paste.py: starts the whole system -->
            ```bash
            make dev
            ```
            ```json
            {"a": 1}
            ```
            <!-- not run by tests/test_docs_paste.py: nothing follows -->
            text
            """
        )
    )
    blocks = blocks_of(page)
    assert [(b.line, b.language, b.skip) for b in blocks] == [
        (2, "sh", None),
        (6, "bash", "starts the whole system"),
        (9, "json", None),
    ]
    assert blocks[0].text == "echo one\n"
    assert [b.line for b in shell_blocks(page)] == [2, 6]
    assert stray_marks(page) == [f"{page}:12"]
    assert rewrite("curl -s localhost:8000/x -H @.chainloom/api_key", 8123, Path("/d")) == (
        "curl -s localhost:8123/x -H @/d/api_key"
    )


# --------------------------------------------------------------------------- the session

# Prepended to every page's session. `curl` becomes a function that runs the real curl,
# prints the body as curl would, and fails (exit 22, and a line in $DOCS_FAILURES, which
# survives subshells and pipelines) on a 4xx/5xx answer. The ERR trap makes any failing
# command end the session, naming the block and the command.
PRELUDE = r"""
set -o pipefail -o errtrace
__docs_failed() {
  # `return N` is the curl wrapper's failure, which it has reported already.
  case "$2" in
    return\ *) ;;
    *) printf "docs-paste: %s: command failed (exit %s): %s\n" "$DOCS_BLOCK" "$1" "$2" \
         | tee -a "$DOCS_FAILURES" >&2 ;;
  esac
  exit "$1"
}
trap '__docs_failed "$?" "$BASH_COMMAND"' ERR
curl() {
  local __arg
  for __arg in "$@"; do
    case "$__arg" in
      -o|--output|-w|--write-out|-O|--remote-name)
        echo "docs-paste: curl $__arg is not supported by tests/test_docs_paste.py" >&2
        return 2 ;;
    esac
  done
  local __body __code __rc=0
  __body=$(mktemp)
  __code=$(command curl -sS -o "$__body" -w '%{http_code}' "$@") || __rc=$?
  cat "$__body"
  [ -s "$__body" ] && [ -n "$(tail -c1 "$__body")" ] && echo
  rm -f "$__body"
  if [ "$__rc" -ne 0 ]; then
    printf "docs-paste: %s: curl exited %s: curl %s\n" "$DOCS_BLOCK" "$__rc" "$*" \
      | tee -a "$DOCS_FAILURES" >&2
    return "$__rc"
  fi
  printf "docs-paste: HTTP %s from curl %s\n" "$__code" "$*" >&2
  if [ "$__code" -ge 400 ]; then
    printf "docs-paste: %s: HTTP %s from curl %s\n" "$DOCS_BLOCK" "$__code" "$*" \
      | tee -a "$DOCS_FAILURES" >&2
    return 22
  fi
}
"""


def rewrite(command: str, port: int, data_dir: Path) -> str:
    """Move `make dev`'s address and data directory to the test's; nothing else changes."""
    command = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{port}", command)
    return re.sub(r"(?<![\w./-])\.chainloom\b", str(data_dir), command)


def session_env(port: int, data_dir: Path) -> dict[str, str]:
    """The reader's shell: nothing of ours set, the venv not activated (docs say .venv/bin)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAINLOOM_", "TEMPORAL_", "OPENAI_", "OLLAMA_"))
        and k not in ("DATABASE_URL", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    # The CLI's defaults are `make dev`'s address and data directory: the same rewrite.
    env["CHAINLOOM_API_URL"] = f"http://127.0.0.1:{port}"
    env["CHAINLOOM_DATA_DIR"] = str(data_dir)
    return env


@dataclass
class Dev:
    port: int
    data_dir: Path
    work: Path


@pytest.fixture(scope="module")
def model_server() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM(models=list(MODELS), port=OLLAMA_PORT)
    # What a real model would answer to the shipped sentiment-router's classify task.
    server.reply("sentiment", "positive")
    try:
        server.start()
    except OSError as err:
        pytest.skip(f"port {OLLAMA_PORT}, where the docs put Ollama, is taken: {err}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, model_server: ScriptedLLM) -> Iterator[Dev]:
    work = tmp_path_factory.mktemp("docs_paste")
    data_dir = work / "data"
    port, temporal_port, ui_port = free_port(), free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAINLOOM_") and k != "DATABASE_URL"
    }
    log = (work / "dev.log").open("w")
    proc = subprocess.Popen(
        dev_command(port, temporal_port, ui_port, data_dir),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_until_running(proc, work / "dev.log")
        yield Dev(port, data_dir, work)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _wait_until_running(proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "API key" in log.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"chainloom dev did not start:\n{log.read_text()[-4000:]}")


@dataclass
class Session:
    returncode: int
    stdout: str
    stderr: str
    problems: str  # what the ERR trap and the curl wrapper recorded

    @property
    def transcript(self) -> str:
        return f"--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"


def run_session(
    blocks: list[tuple[str, str]], work: Path, env: dict[str, str], timeout: float
) -> Session:
    """Run (name, commands) blocks in order in one bash, as pasted into one terminal."""
    failures = work / "failures"
    failures.write_text("")
    parts = [PRELUDE]
    for n, (name, text) in enumerate(blocks):
        source = work / f"block-{n}.sh"
        source.write_text(text)
        parts.append(f"DOCS_BLOCK={shlex.quote(name)}")
        parts.append('printf "docs-paste: === %s\\n" "$DOCS_BLOCK" >&2')
        parts.append(f"source {shlex.quote(str(source))}")
    # Its own process group, so a command that hangs is stopped with everything it started.
    proc = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(parts) + "\n"],
        cwd=ROOT,
        env={**env, "DOCS_FAILURES": str(failures)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\ndocs-paste: the session ran over {timeout} s and was killed"
        failures.write_text(failures.read_text() + f"the session ran over {timeout} s\n")
    return Session(proc.returncode, stdout, stderr, failures.read_text().strip())


class _Answers(BaseHTTPRequestHandler):
    """/ok answers 200 with a token, /missing 404, anything else 422 (a body it cannot read)."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status = 200 if self.path == "/ok" else 404 if self.path == "/missing" else 422
        body = b'{"token": "t0k"}' if status == 200 else b'{"error": "no"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    "command",
    [
        "curl -s $URL/bad -d '{}'",
        "TOKEN=$(curl -s $URL/bad | jq -r .token)",
        "curl -s $URL/missing | jq .",
        "curl -s $URL/missing || true",
        "curl -s http://127.0.0.1:1/nothing-listens",
        "false",
        "echo ok | grep -q nothing",
    ],
)
def test_the_session_fails_on_an_error_status_or_a_failing_command(
    tmp_path: Path, command: str
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "URL": f"http://127.0.0.1:{server.server_address[1]}"}
        ok = run_session([("first", "TOKEN=$(curl -s $URL/ok | jq -r .token)")], tmp_path, env, 30)
        assert ok.returncode == 0 and not ok.problems, ok.transcript
        blocks = [
            ("first", 'TOKEN=$(curl -s $URL/ok | jq -r .token)\ntest "$TOKEN" = t0k'),
            ("second", command),
            ("third", "echo never reached"),
        ]
        session = run_session(blocks, tmp_path, env, 30)
    finally:
        server.shutdown()
        server.server_close()
    # The failure is recorded against its block even where the shell carries on (`|| true`).
    assert "second" in session.problems and "first" not in session.problems, session.transcript
    if "||" not in command:
        assert session.returncode != 0 and "never reached" not in session.stdout


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_pastes(page: Path, dev: Dev) -> None:
    runs = [b for b in shell_blocks(page) if b.skip is None]
    for block in shell_blocks(page):
        if block.skip is not None:
            print(f"not run: {block.where}: {block.skip}")
    if not runs:
        pytest.skip("no shell block to run on this page")
    work = dev.work / page.stem
    work.mkdir(exist_ok=True)
    blocks = [(b.where, rewrite(b.text, dev.port, dev.data_dir)) for b in runs]
    session = run_session(blocks, work, session_env(dev.port, dev.data_dir), PAGE_TIMEOUT)
    print(session.transcript)  # shown with -rP: what the reader would have seen
    assert session.returncode == 0 and not session.problems, (
        f"{shown(page)}: a pasted command failed\n{session.problems}\n{session.transcript}"
    )
