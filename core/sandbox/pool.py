"""Runs JavaScript functions in a small pool of host processes (see core/sandbox/host.py).

Each call gets a fresh V8 isolate in one of the hosts; the caller's event loop only waits on a
pipe. A host that dies mid-call (V8 aborts the process on some out-of-memory paths) or that
overruns its limits is killed and replaced, and the call fails with a clear `JSError`.

Limits of a call:

- JS time (`timeout`, CHAINLOOM_JS_TIMEOUT): time spent running JavaScript. It stops counting
  while a builtin (httpFetch, executeTaskChain, ...) waits for the parent.
- wall time (`wall_timeout`, CHAINLOOM_JS_WALL_TIMEOUT): the whole call, builtins included.
  A builtin gets what is left of it as its own deadline.
- memory (`memory_mb`, CHAINLOOM_JS_MEMORY_MB): V8's heap, plus a cap on the host's resident
  memory for what lives outside the heap (typed arrays, wasm).

Builtins are served here, in the caller's process: the host sends {"op": "call", name, args}
and waits for the answer. The handler (an async callable) holds whatever the builtins need
(database, Temporal client, secrets), none of which ever reaches the host process.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import Settings

log = logging.getLogger("chainloom.js")

HOST_SCRIPT = Path(__file__).with_name("host.py")
FRAME = struct.Struct(">I")
# Must match core/sandbox/host.py.
EXIT_MEMORY = 86
# Time a host gets past a limit to stop the script itself before it is killed.
GRACE = 1.0
START_TIMEOUT = 30.0
MAX_FRAME = 256 * 1024 * 1024

BuiltinHandler = Callable[[str, list[Any], float], Awaitable[Any]]


class JSError(Exception):
    """A call that did not produce a result.

    kind: "syntax" (the script does not parse), "script" (it threw, or has no main),
    "timeout", "memory", "result" (the value cannot be returned), "crash" (the host died
    for another reason; worth retrying).
    """

    def __init__(self, kind: str, message: str, logs: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.logs = logs or []

    @property
    def permanent(self) -> bool:
        return self.kind != "crash"


@dataclass
class JSResult:
    value: Any
    logs: list[str] = field(default_factory=list)


class _Host:
    """One host process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_task = asyncio.ensure_future(self._drain_stderr())
        self.v8 = ""

    @classmethod
    async def start(cls, memory_mb: int, prewarm: bool, idle_exit: float) -> "_Host":
        config = json.dumps({"memory_mb": memory_mb, "prewarm": prewarm, "idle_exit": idle_exit})
        # A minimal environment: the host runs untrusted code and needs no settings or secrets.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            str(HOST_SCRIPT),
            config,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        host = cls(proc)
        try:
            ready = await asyncio.wait_for(host.recv(), START_TIMEOUT)
        except BaseException:
            await host.kill()
            raise
        if not ready or ready.get("op") != "ready":
            code = await host.kill()
            tail = " | ".join(host.stderr_tail)
            raise JSError("crash", f"the JavaScript host did not start (exit {code}): {tail}")
        host.v8 = str(ready.get("v8", ""))
        return host

    async def _drain_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text and not text.startswith("    "):
                self.stderr_tail.append(text)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, message: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        body = json.dumps(message, separators=(",", ":")).encode()
        stdin.write(FRAME.pack(len(body)) + body)
        await stdin.drain()

    async def recv(self) -> dict[str, Any] | None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            (size,) = FRAME.unpack(await stdout.readexactly(FRAME.size))
            if size > MAX_FRAME:
                return None
            message: dict[str, Any] = json.loads(await stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return message

    async def wait(self) -> int:
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        return code

    async def kill(self) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await self.proc.wait()
        self._stderr_task.cancel()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return code

    def close_nowait(self) -> None:
        """Closing stdin makes an idle host exit on its own."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()


class _HostGone(Exception):
    """The host was gone before it took the call."""


class _Lease:
    """A pool slot that a call may give back while it waits, and take again."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = False

    async def take(self) -> None:
        await self._slots.acquire()
        self._held = True

    def give(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class JSRunner:
    """A pool of JavaScript hosts bound to the event loop that first uses it."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        memory_mb: int = 128,
        wall_timeout: float = 60.0,
        size: int = 2,
        prewarm: bool = True,
        idle_exit: float = 900.0,
        max_result_bytes: int = 1 << 20,
    ) -> None:
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.wall_timeout = wall_timeout
        self.size = max(1, size)
        self.prewarm = prewarm
        # A host idle this long exits (and is started again when needed), so hosts of a runner
        # whose event loop went away do not linger.
        self.idle_exit = idle_exit
        self.max_result_bytes = max_result_bytes
        # Least recently used first: with two hosts, one prepares its next isolate while the
        # other serves, so back-to-back calls never wait for an isolate to be created.
        self._idle: deque[_Host] = deque()
        self._starting: list[asyncio.Task[_Host]] = []
        self._busy: set[_Host] = set()  # hosts in a call right now
        self._slots: asyncio.Semaphore | None = None
        self._reaping: set[asyncio.Future[int]] = set()
        self._closed = False

    # ------------------------------------------------------------------ public API

    async def run(
        self,
        script: str,
        input: Any = None,
        *,
        builtins: BuiltinHandler | None = None,
        time_limit: float | None = None,
        wall_limit: float | None = None,
        max_result: int | None = None,
    ) -> JSResult:
        """Run `main(input)` of `script`; its JSON result, or JSError. `max_result` raises
        the result limit for a caller that keeps large results out of history."""
        try:
            input_text = json.dumps(input)
        except (TypeError, ValueError) as err:
            raise JSError("script", f"the input is not JSON: {err}") from err
        message = {
            "op": "run",
            "script": script,
            "input": input_text,
            "timeout": time_limit or self.timeout,
            "max_result": max(max_result or 0, self.max_result_bytes),
        }
        done = await self._call(message, builtins, time_limit, wall_limit)
        try:
            value = json.loads(done["result"]) if done.get("result") is not None else None
        except ValueError as err:
            raise JSError("result", f"the function's result is not JSON: {err}") from err
        return JSResult(value, list(done.get("logs") or []))

    async def check(self, script: str) -> None:
        """Raise JSError("syntax") when `script` does not parse. Runs none of it."""
        await self._call({"op": "check", "script": script, "timeout": self.timeout}, None)

    async def warm(self) -> None:
        """Start the hosts now rather than on the first call."""
        while self._count() < self.size:
            self._spare()
        await asyncio.gather(*self._starting, return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for task in self._starting:
            task.cancel()
        hosts = list(self._idle)
        self._idle.clear()
        await asyncio.gather(*(h.kill() for h in hosts), return_exceptions=True)

    # ------------------------------------------------------------------ the pool

    def _slot(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        return self._slots

    def _spare(self) -> None:
        task = asyncio.ensure_future(_Host.start(self.memory_mb, self.prewarm, self.idle_exit))
        self._starting.append(task)

        def ready(done: asyncio.Task[_Host]) -> None:
            if done not in self._starting:
                return  # claimed by a caller, who awaits it
            self._starting.remove(done)
            if done.cancelled() or done.exception() is not None:
                return
            host = done.result()
            if self._closed:
                host.close_nowait()
            else:
                self._idle.append(host)

        task.add_done_callback(ready)

    def _count(self) -> int:
        return len(self._idle) + len(self._starting) + len(self._busy)

    async def _acquire(self) -> _Host:
        host: _Host | None = None
        while self._idle and host is None:
            candidate = self._idle.popleft()
            if candidate.alive:
                host = candidate
        if host is None and self._starting:
            host = await self._starting.pop(0)
        if host is None:
            host = await _Host.start(self.memory_mb, self.prewarm, self.idle_exit)
        self._busy.add(host)
        if self._count() < self.size:
            # Grow to full size in the background: sequential calls alternate between hosts,
            # so each host prepares its next isolate while another one serves.
            self._spare()
        return host

    def _release(self, host: _Host, healthy: bool) -> None:
        self._busy.discard(host)
        if healthy and host.alive and not self._closed and self._count() < self.size:
            self._idle.append(host)
            return
        if host.alive:
            if healthy:
                host.close_nowait()  # an extra host, started while others waited on builtins
            else:
                task = asyncio.ensure_future(host.kill())
                self._reaping.add(task)
                task.add_done_callback(self._reaping.discard)
        if not self._closed and self._count() < self.size:
            # Replace it in the background, so the next call finds a host ready.
            self._spare()

    async def _call(
        self,
        message: dict[str, Any],
        builtins: BuiltinHandler | None,
        time_limit: float | None = None,
        wall_limit: float | None = None,
    ) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the JS runner is closed")
        js_timeout = time_limit or self.timeout
        wall = wall_limit or self.wall_timeout
        lease = _Lease(self._slot())
        await lease.take()
        try:
            for attempt in (1, 2):
                host = await self._acquire()
                healthy = False
                try:
                    done = await self._exchange(host, message, builtins, js_timeout, wall, lease)
                    healthy = not done.get("retire")
                    break
                except _HostGone as err:
                    # An idle host that had just exited (idle timeout, killed): the call never
                    # started, so it is safe to hand it to another host once.
                    if attempt == 2:
                        raise JSError("crash", "the JavaScript host is gone; try again") from err
                finally:
                    self._release(host, healthy)
        finally:
            lease.give()
        if done.get("ok"):
            return done
        raise self._error(done, js_timeout)

    async def _exchange(
        self,
        host: _Host,
        message: dict[str, Any],
        builtins: BuiltinHandler | None,
        js_timeout: float,
        wall: float,
        lease: "_Lease",
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = 0.0  # seconds spent serving builtins, which the JS time limit does not count
        try:
            await host.send(message)
        except ConnectionError as err:
            raise _HostGone() from err
        answered = False
        while True:
            js_deadline = started + js_timeout + waited + GRACE
            wall_deadline = started + wall + GRACE
            try:
                # timeout_at, not wait_for: no extra task per frame on this hot path.
                async with asyncio.timeout_at(min(js_deadline, wall_deadline)):
                    frame = await host.recv()
            except TimeoutError:
                await host.kill()
                if wall_deadline <= js_deadline:
                    raise JSError("timeout", _wall_message(wall)) from None
                raise JSError("timeout", _timeout_message(js_timeout)) from None
            if frame is None:
                code = await host.wait()
                if code == 0 and not answered:
                    raise _HostGone()
                raise self._death(host, code)
            answered = True
            if frame.get("op") == "call":
                before = loop.time()
                # A call waiting on a builtin computes nothing: its slot goes to other calls
                # meanwhile (on a host of their own), so a function waiting for a chain that
                # runs another function cannot starve the pool.
                lease.give()
                reply = await self._serve(builtins, frame, started + wall - before)
                await lease.take()
                waited += loop.time() - before
                try:
                    await host.send(reply)
                except ConnectionError:
                    continue  # the next read sees the host gone
            elif frame.get("op") == "done":
                return frame

    async def _serve(
        self, builtins: BuiltinHandler | None, frame: dict[str, Any], left: float
    ) -> dict[str, Any]:
        name = str(frame.get("name"))
        args = frame.get("args") or []
        if builtins is None:
            return {"op": "reply", "ok": False, "error": f"{name} is not available here"}
        if left <= 0:
            return {"op": "reply", "ok": False, "error": _wall_message(self.wall_timeout)}
        try:
            value = await asyncio.wait_for(builtins(name, list(args), left), left)
        except TimeoutError:
            error = f"{name} did not answer within the {left:.1f} s left of the call's wall time"
            return {"op": "reply", "ok": False, "error": error}
        except Exception as err:
            return {"op": "reply", "ok": False, "error": str(err) or type(err).__name__}
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            return {"op": "reply", "ok": False, "error": f"{name} returned no JSON: {err}"}
        return {"op": "reply", "ok": True, "value": value}

    # ------------------------------------------------------------------ errors

    def _death(self, host: _Host, code: int) -> JSError:
        tail = " | ".join(host.stderr_tail)
        oom = "out of memory" in tail.lower() or "allocation failed" in tail.lower()
        if code == EXIT_MEMORY or oom or code in (-signal.SIGTRAP, -signal.SIGABRT):
            return JSError("memory", _memory_message(self.memory_mb))
        log.warning("JavaScript host died with status %s: %s", code, tail)
        return JSError("crash", f"the JavaScript host died (exit status {code}); try again")

    def _error(self, done: dict[str, Any], js_timeout: float) -> JSError:
        kind = str(done.get("kind") or "script")
        logs = list(done.get("logs") or [])
        detail = str(done.get("error") or "")
        if kind == "timeout":
            return JSError(kind, _timeout_message(js_timeout), logs)
        if kind == "memory":
            return JSError(kind, _memory_message(self.memory_mb), logs)
        if kind == "result":
            if ">" in detail:
                size, _, limit = detail.partition(" > ")
                detail = (
                    f"the function's result is {size} bytes of JSON; at most {limit} may be "
                    "returned"
                )
            return JSError(kind, detail, logs)
        return JSError(kind, detail or "the function failed", logs)


def _timeout_message(seconds: float) -> str:
    return (
        f"the function ran longer than its time limit of {seconds:g} s (CHAINLOOM_JS_TIMEOUT) "
        "and was stopped"
    )


def _wall_message(seconds: float) -> str:
    return (
        f"the call took longer than {seconds:g} s in all, builtin calls included "
        "(CHAINLOOM_JS_WALL_TIMEOUT), and was stopped"
    )


def _memory_message(memory_mb: int) -> str:
    return (
        f"the function went over its memory limit of {memory_mb} MB (CHAINLOOM_JS_MEMORY_MB) "
        "and was stopped"
    )


# One runner per event loop and limits: hosts' pipes belong to the loop that started them.
_RUNNERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], JSRunner]]"
_RUNNERS = weakref.WeakKeyDictionary()


def shared_runner(
    *, timeout: float, memory_mb: int, wall_timeout: float = 60.0, size: int = 2
) -> JSRunner:
    """The runner of the running event loop for these limits (created on first use)."""
    loop = asyncio.get_running_loop()
    runners = _RUNNERS.setdefault(loop, {})
    key = (timeout, memory_mb, wall_timeout, size)
    runner = runners.get(key)
    if runner is None or runner._closed:
        runner = JSRunner(
            timeout=timeout, memory_mb=memory_mb, wall_timeout=wall_timeout, size=size
        )
        runners[key] = runner
    return runner


def runner_for(settings: Settings) -> JSRunner:
    """The running event loop's runner for the CHAINLOOM_JS_* settings."""
    return shared_runner(
        timeout=settings.js_timeout,
        memory_mb=settings.js_memory_mb,
        wall_timeout=settings.js_wall_timeout,
        size=settings.js_pool_size,
    )
