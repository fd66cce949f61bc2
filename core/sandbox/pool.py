"""Runs JavaScript functions in a pool of host processes (see core/sandbox/host.py).

Each call gets a fresh V8 isolate in one of the hosts; the caller's event loop only waits on a
pipe. A host that dies mid-call (V8 aborts the process on some out-of-memory paths) or that
overruns its limits is killed and replaced, and the call fails with a clear `JSError`.

The pool keeps `size` hosts warm (CHAINLOOM_JS_POOL_SIZE), grows up to `max_size`
(CHAINLOOM_JS_POOL_MAX) while calls need more, and lets hosts above `size` go once they have
not been needed for `shrink_after` seconds. Who gets a host when is decided by the fair queue
(core/sandbox/fair.py): per-tenant caps and round robin across tenants, so one tenant's slow
functions cannot hold up another's.

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
from core.sandbox.fair import Busy, FairQueue, Turn

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
# Calls that may wait for a turn in one process, all tenants together, per host of the pool's
# maximum: with the worker's activity slots sized from it (worker.py), waiting JS calls can
# never take the slots other activity types need.
QUEUE_PER_HOST = 4


class JSError(Exception):
    """A call that did not produce a result.

    kind: "syntax" (the script does not parse), "script" (it threw, or has no main),
    "timeout", "memory", "result" (the value cannot be returned), "crash" (the host died
    for another reason; worth retrying), "busy" (the call never ran: its tenant's queue was
    full, or its turn did not come in time; worth retrying later).
    """

    def __init__(self, kind: str, message: str, logs: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.logs = logs or []

    @property
    def permanent(self) -> bool:
        return self.kind not in ("crash", "busy")


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

    async def retire(self) -> int:
        """Let an idle host exit on its own (it finishes the isolate it is preparing)."""
        self.close_nowait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), START_TIMEOUT)
        return await self.kill()


class _HostGone(Exception):
    """The host was gone before it took the call."""


class JSRunner:
    """A pool of JavaScript hosts bound to the event loop that first uses it."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        memory_mb: int = 128,
        wall_timeout: float = 60.0,
        size: int = 2,
        max_size: int = 8,
        tenant_concurrency: int = 2,
        tenant_queue: int = 20,
        queue: int | None = None,
        shrink_after: float = 30.0,
        prewarm: bool = True,
        idle_exit: float = 900.0,
        max_result_bytes: int = 1 << 20,
    ) -> None:
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.wall_timeout = wall_timeout
        self.size = max(1, size)  # hosts kept warm
        self.max_size = max(self.size, max_size)  # hosts at most, busy, idle or exiting
        self.tenant_concurrency = max(1, tenant_concurrency)
        self.shrink_after = shrink_after
        self.prewarm = prewarm
        # A host idle this long exits (and is started again when needed), so hosts of a runner
        # whose event loop went away do not linger.
        self.idle_exit = idle_exit
        self.max_result_bytes = max_result_bytes
        self.fair = FairQueue(
            hosts=self.max_size,
            running=self.tenant_concurrency,
            # Whatever one tenant holds (running, or waiting on builtins), another tenant
            # still finds TENANT_CONCURRENCY hosts it cannot take.
            tenant_hosts=max(self.tenant_concurrency, self.max_size - self.tenant_concurrency),
            tenant_queue=tenant_queue,
            queue=QUEUE_PER_HOST * self.max_size if queue is None else queue,
        )
        # Least recently used first: with two hosts, one prepares its next isolate while the
        # other serves, so back-to-back calls never wait for an isolate to be created.
        self._idle: deque[_Host] = deque()
        self._starts: set[asyncio.Task[_Host]] = set()  # every host start in flight
        self._starting: list[asyncio.Task[_Host]] = []  # the starts no call has claimed yet
        self._busy: set[_Host] = set()  # hosts in a call right now
        self._reaping: set[asyncio.Future[int]] = set()  # hosts on their way out
        # The fewest idle hosts seen since the last shrink check: that many were not needed.
        self._low_water = 0
        self._shrink_timer: asyncio.TimerHandle | None = None
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
        tenant: str = "",
        beat: Callable[[], Any] | None = None,
        max_result: int | None = None,
    ) -> JSResult:
        """Run `main(input)` of `script`; its JSON result, or JSError.

        `tenant` decides the call's place in the fair queue; `beat` is called every second
        while the call waits for its turn (the js_run activity heartbeats with it).
        `max_result` raises the result limit for a caller that keeps large results out of
        history.
        """
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
        done = await self._call(message, builtins, time_limit, wall_limit, tenant, beat)
        try:
            value = json.loads(done["result"]) if done.get("result") is not None else None
        except ValueError as err:
            raise JSError("result", f"the function's result is not JSON: {err}") from err
        return JSResult(value, list(done.get("logs") or []))

    async def check(self, script: str, *, tenant: str = "") -> None:
        """Raise JSError("syntax") when `script` does not parse. Runs none of it."""
        message = {"op": "check", "script": script, "timeout": self.timeout}
        await self._call(message, None, tenant=tenant)

    async def warm(self) -> None:
        """Start the hosts now rather than on the first call."""
        while self._count() < self.size:
            self._launch()
        await asyncio.gather(*self._starting, return_exceptions=True)

    @property
    def processes(self) -> int:
        """Host processes of this pool: idle, starting, in a call, or exiting."""
        return self._count()

    async def close(self) -> None:
        self._closed = True
        if self._shrink_timer is not None:
            self._shrink_timer.cancel()
        for task in self._starting:
            task.cancel()
        await asyncio.gather(*self._starts, return_exceptions=True)
        hosts = list(self._idle)
        self._idle.clear()
        await asyncio.gather(*(h.kill() for h in hosts), *self._reaping, return_exceptions=True)

    # ------------------------------------------------------------------ the pool

    def _launch(self) -> None:
        """Start a host in the background; it joins the idle ones unless a call claims it."""
        task = asyncio.ensure_future(_Host.start(self.memory_mb, self.prewarm, self.idle_exit))
        self._starts.add(task)
        self._starting.append(task)

        def ready(done: asyncio.Task[_Host]) -> None:
            if done not in self._starting:
                return  # claimed by a call, which takes it from here
            self._starting.remove(done)
            self._starts.discard(done)
            if done.cancelled() or done.exception() is not None:
                return
            host = done.result()
            if self._closed:
                host.close_nowait()
            else:
                self._idle.append(host)
                self._schedule_shrink()

        task.add_done_callback(ready)

    async def _claim(self) -> _Host:
        task = self._starting.pop(0)
        try:
            host = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The call was cancelled while its host started: the host goes to the pool.
            if not task.done():
                self._starting.append(task)
            else:
                self._starts.discard(task)
                if not task.cancelled() and task.exception() is None:
                    self._release(task.result(), True)
            raise
        except BaseException:
            self._starts.discard(task)
            raise
        self._starts.discard(task)
        return host

    def _count(self) -> int:
        return len(self._idle) + len(self._starts) + len(self._busy) + len(self._reaping)

    def _top_up(self) -> None:
        while not self._closed and self._count() < self.size:
            self._launch()

    async def _acquire(self, tenant: str) -> _Host:
        """A host for a call that has its turn; the turn guarantees one is free or exiting."""
        # The last idle host is left to a tenant with no other call in the pool: a tenant with
        # several (loops that get their hosts killed and replaced, say) waits for a host of its
        # own to start instead, so the next tenant to arrive finds one ready.
        crowded = self.fair.tenant_figures(tenant)[1] > 1
        while True:
            host: _Host | None = None
            while self._idle and host is None:
                if (
                    crowded
                    and len(self._idle) == 1
                    and (self._starting or self._count() < self.max_size)
                ):
                    break
                candidate = self._idle.popleft()
                if candidate.alive:
                    host = candidate
                else:
                    self._retire(candidate, kill=True)  # exited on its own (idle timeout)
            if host is None and not self._starting and self._count() < self.max_size:
                self._launch()
            if host is None and self._starting:
                host = await self._claim()
            if host is not None:
                break
            # Every process the maximum allows is busy or exiting: wait for one to exit.
            if not self._reaping:
                raise JSError("crash", "no JavaScript host is free; try again")
            await asyncio.wait(set(self._reaping), return_when=asyncio.FIRST_COMPLETED)
        self._busy.add(host)
        self._low_water = min(self._low_water, len(self._idle))
        if not self._idle and not self._starting and self._count() < self.max_size:
            # Keep one host ready while calls come in, so the next caller (another tenant's,
            # say) does not wait for a host to start.
            self._launch()
        self._top_up()
        self._schedule_shrink()
        return host

    def _release(self, host: _Host, healthy: bool) -> None:
        self._busy.discard(host)
        if healthy and host.alive and not self._closed:
            self._idle.append(host)
            self._schedule_shrink()
            return
        self._retire(host, kill=not healthy or not host.alive)
        # The replacement starts once the old process is gone (see _reaped), so the pool never
        # holds more than max_size processes.

    def _retire(self, host: _Host, *, kill: bool) -> None:
        task = asyncio.ensure_future(host.kill() if kill else host.retire())
        self._reaping.add(task)
        task.add_done_callback(self._reaped)

    def _reaped(self, task: "asyncio.Future[int]") -> None:
        self._reaping.discard(task)
        self._top_up()

    def _schedule_shrink(self) -> None:
        if self._shrink_timer is None and not self._closed and self._count() > self.size:
            self._low_water = len(self._idle)
            loop = asyncio.get_running_loop()
            self._shrink_timer = loop.call_later(self.shrink_after, self._shrink)

    def _shrink(self) -> None:
        """Let go of the hosts above the minimum that stayed idle for a whole period."""
        self._shrink_timer = None
        if self._closed:
            return
        spare = 1 if self._busy else 0  # under load, one stays ready (see _acquire)
        surplus = min(self._count() - self.size, self._low_water - spare, len(self._idle))
        for _ in range(max(0, surplus)):
            # The most recently used: the others keep their least-recently-used order.
            self._retire(self._idle.pop(), kill=False)
        self._schedule_shrink()

    async def _call(
        self,
        message: dict[str, Any],
        builtins: BuiltinHandler | None,
        time_limit: float | None = None,
        wall_limit: float | None = None,
        tenant: str = "",
        beat: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the JS runner is closed")
        js_timeout = time_limit or self.timeout
        wall = wall_limit or self.wall_timeout
        # The wall time counts from here: time spent waiting for a turn is part of the call.
        wall_end = asyncio.get_running_loop().time() + wall
        try:
            turn = await self.fair.enter(tenant, wall_end, beat)
        except Busy as err:
            raise JSError("busy", f"the call was not run: {err}") from None
        except TimeoutError:
            raise JSError("busy", _turn_message(wall)) from None
        try:
            for attempt in (1, 2):
                host = await self._acquire(tenant)
                healthy = False
                try:
                    done = await self._exchange(
                        host, message, builtins, js_timeout, wall, wall_end, turn
                    )
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
            self.fair.leave(turn)
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
        wall_end: float,
        turn: Turn,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = 0.0  # seconds spent serving builtins, which the JS time limit does not count
        wall_deadline = wall_end + GRACE
        try:
            await host.send(message)
        except ConnectionError as err:
            raise _HostGone() from err
        answered = False
        while True:
            js_deadline = started + js_timeout + waited + GRACE
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
                # A call waiting on a builtin computes nothing: its tenant's running slot goes
                # to the tenant's other calls meanwhile (its host stays: the isolate is there),
                # so a function waiting for a chain that runs another function does not block it.
                self.fair.pause(turn)
                reply = await self._serve(builtins, frame, wall_end - before)
                try:
                    async with asyncio.timeout_at(wall_deadline):
                        await self.fair.resume(turn)
                except TimeoutError:
                    await host.kill()
                    raise JSError("timeout", _wall_message(wall)) from None
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


def _turn_message(seconds: float) -> str:
    return (
        f"the call waited {seconds:g} s for a turn at the JavaScript pool and was not run "
        "(CHAINLOOM_JS_WALL_TIMEOUT): the tenant's other functions held its share "
        "(CHAINLOOM_JS_TENANT_CONCURRENCY), or all tenants together the whole pool "
        "(CHAINLOOM_JS_POOL_MAX)"
    )


def _memory_message(memory_mb: int) -> str:
    return (
        f"the function went over its memory limit of {memory_mb} MB (CHAINLOOM_JS_MEMORY_MB) "
        "and was stopped"
    )


# One runner per event loop and settings: hosts' pipes belong to the loop that started them.
_RUNNERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], JSRunner]]"
_RUNNERS = weakref.WeakKeyDictionary()


def shared_runner(**options: Any) -> JSRunner:
    """The runner of the running event loop for these JSRunner options (made on first use)."""
    loop = asyncio.get_running_loop()
    runners = _RUNNERS.setdefault(loop, {})
    key = tuple(sorted(options.items()))
    runner = runners.get(key)
    if runner is None or runner._closed:
        runner = JSRunner(**options)
        runners[key] = runner
    return runner


def runner_for(settings: Settings) -> JSRunner:
    """The running event loop's runner for the CHAINLOOM_JS_* settings."""
    return shared_runner(
        timeout=settings.js_timeout,
        memory_mb=settings.js_memory_mb,
        wall_timeout=settings.js_wall_timeout,
        size=settings.js_pool_size,
        max_size=settings.js_pool_max,
        tenant_concurrency=settings.js_tenant_concurrency,
        tenant_queue=settings.js_tenant_queue,
        shrink_after=settings.js_pool_idle,
    )
