"""A JavaScript host process: runs one call at a time, each in a fresh mini-racer isolate.

`core.sandbox.pool` starts a few of these and talks to each over its stdin/stdout with
length-prefixed JSON frames. JavaScript runs here, not in the worker, because V8 answers some
allocations (``new Array(1e9).fill(1)``) by aborting the whole process: when that happens only
this process dies, and the runner replaces it.

Per call: a fresh isolate (created ahead of time, while the host is idle, so a call does not
pay for it), a hard heap limit, a JS time budget that stops counting while a builtin waits on
the parent, and an RSS watchdog for memory V8 does not see (typed arrays, wasm) or cannot stop
(a C++ builtin filling a huge array). The isolate has no `require`, no file system and no
network: only ECMAScript, mini-racer's setTimeout, and the builtins installed below.

Builtins are synchronous JavaScript functions. A call writes its request into a
SharedArrayBuffer and invokes a mini-racer callback; V8 runs that callback on its own thread
and waits for it, so the callback can ask the parent over the pipe, write the answer into the
same buffer and return, and the JavaScript reads the answer as a plain return value.

This file is run as a script (``python -I core/sandbox/host.py CONFIG``) and imports nothing from
chainloom, so a host starts fast and holds no settings, secrets or database handles.
"""

import asyncio
import contextlib
import json
import os
import re
import resource
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from py_mini_racer import (
    JSEvalException,
    JSFunction,
    JSOOMException,
    JSParseException,
    JSTimeoutException,
    MiniRacer,
    init_mini_racer,
)
from py_mini_racer import _context as mr_context

# Exit status when the RSS watchdog stops a call; the runner reports a memory-limit error.
EXIT_MEMORY = 86
# Bytes of the request/answer buffer shared with each isolate; larger messages go in chunks.
CHANNEL_BYTES = 256 * 1024
FRAME = struct.Struct(">I")
MAX_LOG_LINES = 1000
MAX_LOG_CHARS = 64 * 1024
# An idle host exits after this long; the runner starts a new one when needed.
IDLE_EXIT_SECONDS = 900.0
WATCHDOG_INTERVAL = 0.01

# Defines the builtins inside a closure, so user code cannot reach the channel itself.
BOOTSTRAP_JS = r"""
(function (notify, channelBytes) {
  'use strict';
  const g = globalThis;
  const sab = new SharedArrayBuffer(channelBytes);
  const head = new Int32Array(sab, 0, 2);
  const units = new Uint16Array(sab, 8);
  const cap = units.length;
  const stringify = JSON.stringify, parse = JSON.parse;
  const fromCharCode = String.fromCharCode;
  const ErrorType = Error;

  function call(name, args) {
    const text = stringify({ name: name, args: args });
    let pos = 0;
    do {
      const n = Math.min(cap, text.length - pos);
      for (let i = 0; i < n; i++) units[i] = text.charCodeAt(pos + i);
      pos += n;
      head[0] = n;
      head[1] = pos < text.length ? 1 : 0;
      notify();
    } while (pos < text.length);
    let out = '';
    for (;;) {
      const n = head[0];
      for (let i = 0; i < n; i += 4096) {
        out += fromCharCode.apply(null, units.subarray(i, Math.min(n, i + 4096)));
      }
      if (head[1] !== 1) break;
      head[0] = 0;
      head[1] = 2;
      notify();
    }
    const reply = parse(out);
    if (!reply.ok) throw new ErrorType(reply.error);
    return reply.value;
  }

  function show(value) {
    if (typeof value === 'string') return value;
    if (value instanceof ErrorType) return value.stack || String(value);
    if (value === undefined || typeof value === 'function' || typeof value === 'symbol'
        || typeof value === 'bigint') {
      return String(value);
    }
    try {
      const text = stringify(value);
      return text === undefined ? String(value) : text;
    } catch (e) {
      return String(value);
    }
  }

  function logger(level) {
    return function () {
      const parts = [];
      for (let i = 0; i < arguments.length; i++) parts.push(show(arguments[i]));
      call('log', [level, parts.join(' ')]);
    };
  }

  function define(name, fn) {
    Object.defineProperty(g, name, { value: fn, writable: false, configurable: false });
  }

  // mini-racer's setTimeout rests on Atomics.waitAsync, which answers a delay of 0 (or none)
  // synchronously and so breaks the shim: run those after 1 ms, like a browser clamps them.
  const baseSetTimeout = g.setTimeout;
  g.setTimeout = function setTimeout(fn, delay) {
    const args = Array.prototype.slice.call(arguments, 2);
    const ms = Number(delay);
    return baseSetTimeout.apply(g, [fn, ms >= 1 ? ms : 1].concat(args));
  };

  define('console', Object.freeze({
    log: logger(''), info: logger(''), debug: logger(''),
    warn: logger('warn'), error: logger('error'),
  }));
  define('httpFetch', function httpFetch(url, options) {
    if (url !== null && typeof url === 'object') return call('httpFetch', [url]);
    return call('httpFetch', [String(url), options === undefined ? {} : options]);
  });
  define('sendEvent', function sendEvent(eventType, data) {
    return call('sendEvent', [String(eventType), data === undefined ? {} : data]);
  });
  define('executeTask', function executeTask(prompt, modelName, modelProvider) {
    return call('executeTask', [String(prompt), modelName == null ? '' : String(modelName),
                                modelProvider == null ? '' : String(modelProvider)]);
  });
  define('executeTaskChain', function executeTaskChain(chainId, input) {
    return call('executeTaskChain', [String(chainId), input === undefined ? null : input]);
  });
  define('executeHook', function executeHook(hookName, toolName, args) {
    return call('executeHook', [String(hookName), toolName == null ? '' : String(toolName),
                                args === undefined ? {} : args]);
  });

  function encode(value) {
    const text = stringify(value);
    return text === undefined ? 'null' : text;
  }
  function failure(error) {
    if (error instanceof ErrorType) return error.stack || String(error);
    return show(error);
  }
  // Returns the result as JSON text; for an async main it returns nothing and reports the
  // outcome through the channel, so the host never blocks on a promise.
  define('__chainloom_run', function __chainloom_run(inputText) {
    if (typeof main !== 'function') {
      throw new ErrorType('the script must define function main(input)');
    }
    const out = main(parse(inputText));
    if (out !== null && typeof out === 'object' && typeof out.then === 'function') {
      Promise.resolve(out).then(function (value) {
        let text;
        try { text = encode(value); } catch (e) { call('__fail', [failure(e)]); return; }
        call('__done', [text]);
      }, function (error) { call('__fail', [failure(error)]); });
      return undefined;
    }
    return encode(out);
  });
  return sab;
})
//# sourceURL=chainloom-internal
"""
# Names the scripts in stack traces: the user's lines read `function.js:LINE:COL`, and frames of
# our own glue (`chainloom-internal`) are left out of error messages.
SCRIPT_URL = "\n//# sourceURL=function.js"
INTERNAL_URL = "\n//# sourceURL=chainloom-internal"

# Sync callbacks by (context object id, callback id), looked up on V8's thread.
_SYNC: dict[tuple[int, int], Callable[[], None]] = {}
_original_callback = mr_context.Context.handle_callback_from_v8


def _handle_callback_from_v8(self: Any, callback_id: int, raw: Any) -> None:
    """mini-racer hands every JS-to-Python callback to its event loop and returns at once,
    which makes every Python function an async one in JS. Builtins must be synchronous, so
    ours run right here, on V8's thread, while the isolate waits for them."""
    handler = _SYNC.get((id(self), callback_id))
    if handler is None:
        _original_callback(self, callback_id, raw)
        return
    # The argument (an empty array) is not needed: the request is in the shared buffer.
    # Freeing it here, while the isolate waits, is safe and leaves nothing for later.
    self._wrap_raw_handle(raw)
    handler()


mr_context.Context.handle_callback_from_v8 = _handle_callback_from_v8  # type: ignore[method-assign, assignment]


class Pipe:
    """Length-prefixed JSON frames; the reader and the writer may be on different threads."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._buffer = bytearray()
        self._write_fd = write_fd
        self._lock = threading.Lock()

    def wait_readable(self, timeout: float) -> bool:
        if self._buffer:
            return True
        ready, _, _ = select.select([self._read_fd], [], [], timeout)
        return bool(ready)

    def _take(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            chunk = os.read(self._read_fd, max(65536, size - len(self._buffer)))
            if not chunk:
                return None
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read(self) -> dict[str, Any] | None:
        head = self._take(FRAME.size)
        if head is None:
            return None
        body = self._take(FRAME.unpack(head)[0])
        if body is None:
            return None
        message: dict[str, Any] = json.loads(body)
        return message

    def write(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        data = memoryview(FRAME.pack(len(body)) + body)
        with self._lock:
            while data:
                written = os.write(self._write_fd, data)
                data = data[written:]


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


class Isolate:
    """One fresh V8 isolate with the builtins installed; used for a single call."""

    def __init__(self, host: "Host") -> None:
        self.host = host
        self.mr = MiniRacer()
        self.mr.set_hard_memory_limit(host.memory_bytes)
        ctx = self.mr._ctx
        assert ctx is not None
        self._loop = ctx.event_loop
        callback_id = next(ctx._next_async_callback_id)
        notify = ctx._value_handle_to_python(
            ctx._wrap_raw_handle(ctx._dll.mr_make_js_callback(ctx._ctx, callback_id))
        )
        self._key = (id(ctx), callback_id)
        _SYNC[self._key] = self._on_notify
        install = cast("JSFunction", self.mr.eval(BOOTSTRAP_JS))
        # A zero-copy view of the SharedArrayBuffer that carries builtin requests and answers.
        self.channel = cast("memoryview", install(notify, CHANNEL_BYTES))
        # An async main reports its outcome here (from V8's thread).
        self.finished: asyncio.Future[tuple[bool, str]] = self._loop.create_future()
        self.logs: list[str] = []
        self._log_chars = 0
        self._dropped = 0
        self._request: list[str] = []
        self._answer = b""
        self._answer_at = 0
        # Held by V8's thread while a builtin waits on the parent; the watchdog takes it
        # before stopping the script, so a stop never lands in the middle of an exchange.
        self.lock = threading.Lock()
        self.stopped = False
        self.in_builtin_since: float | None = None
        self.builtin_seconds = 0.0

    def close(self) -> None:
        _SYNC.pop(self._key, None)
        del self.channel
        self.mr.close()

    # ----------------------------------------------------------------- V8's thread

    def _on_notify(self) -> None:
        try:
            self._exchange()
        except BaseException as err:  # never let an exception unwind into V8
            self._set_answer({"ok": False, "error": f"internal error in the builtin: {err}"})
            self._send_chunk()

    def _exchange(self) -> None:
        size, flag = struct.unpack_from("<ii", self.channel, 0)
        if flag == 2:
            self._send_chunk()
            return
        size = max(0, min(size, (len(self.channel) - 8) // 2))
        chunk = bytes(self.channel[8 : 8 + 2 * size])
        self._request.append(chunk.decode("utf-16-le", "surrogatepass"))
        if flag == 1:
            return
        text = "".join(self._request)
        self._request.clear()
        request = json.loads(text)
        name = str(request.get("name"))
        args = request.get("args") or []
        if name == "log":
            self._log(str(args[0]) if args else "", str(args[1]) if len(args) > 1 else "")
            self._set_answer({"ok": True, "value": None})
        elif name in ("__done", "__fail"):
            outcome = (name == "__done", str(args[0]) if args else "")
            self._loop.call_soon_threadsafe(self._finish, outcome)
            self._set_answer({"ok": True, "value": None})
        else:
            self._set_answer(self._ask_parent(name, args))
        self._send_chunk()

    def _ask_parent(self, name: str, args: list[Any]) -> dict[str, Any]:
        with self.lock:
            if self.stopped:
                return {"ok": False, "error": "the call is over"}
            started = time.monotonic()
            self.in_builtin_since = started
            try:
                self.host.pipe.write({"op": "call", "name": name, "args": args})
                reply = self.host.pipe.read()
            finally:
                self.builtin_seconds += time.monotonic() - started
                self.in_builtin_since = None
        if reply is None:
            # The parent is gone: nobody will read a result.
            os._exit(0)
        return {
            "ok": bool(reply.get("ok")),
            "value": reply.get("value"),
            "error": reply.get("error"),
        }

    def _finish(self, outcome: tuple[bool, str]) -> None:
        if not self.finished.done():
            self.finished.set_result(outcome)

    def _set_answer(self, answer: dict[str, Any]) -> None:
        self._answer = json.dumps(answer, separators=(",", ":")).encode("utf-16-le")
        self._answer_at = 0

    def _send_chunk(self) -> None:
        room = len(self.channel) - 8
        part = self._answer[self._answer_at : self._answer_at + room]
        self._answer_at += len(part)
        self.channel[8 : 8 + len(part)] = part
        more = 1 if self._answer_at < len(self._answer) else 0
        struct.pack_into("<ii", self.channel, 0, len(part) // 2, more)

    def _log(self, level: str, line: str) -> None:
        if level:
            line = f"[{level}] {line}"
        if len(self.logs) >= MAX_LOG_LINES or self._log_chars + len(line) > MAX_LOG_CHARS:
            self._dropped += 1
            return
        self.logs.append(line)
        self._log_chars += len(line)

    def all_logs(self) -> list[str]:
        if self._dropped:
            return [*self.logs, f"... {self._dropped} more log lines dropped"]
        return list(self.logs)

    # ----------------------------------------------------------------- event loop thread

    def js_seconds(self, since: float) -> float:
        now = time.monotonic()
        waiting = self.builtin_seconds
        started = self.in_builtin_since
        if started is not None:
            waiting += now - started
        return now - since - waiting

    async def execute(self, script: str, input_text: str) -> Any:
        await self.mr.eval_cancelable(script + SCRIPT_URL)
        out = await self.mr.eval_cancelable(
            f"__chainloom_run({json.dumps(input_text)}){INTERNAL_URL}"
        )
        if isinstance(out, str):
            return out
        ok, text = await self.finished
        if not ok:
            raise AsyncFailure(text)
        return text

    async def check(self, script: str) -> None:
        # A throw placed before the script makes V8 parse all of it and run none of it.
        # It goes after a "use strict" prologue, which must stay first to take effect.
        match = _PROLOGUE.match(script)
        cut = match.end() if match else 0
        source = script[:cut] + "throw 0;" + script[cut:]
        try:
            await self.mr.eval_cancelable(source + SCRIPT_URL)
        except JSParseException:
            raise
        except JSEvalException:
            pass

    def seal(self, wait: float = 1.0) -> bool:
        """No builtin may reach the parent any more: the call's answer is about to go out.

        A timer the script left behind could fire after `main` returned; its builtin call must
        not land in the parent's next exchange. A builtin mid-exchange is still being served
        (the parent reads until the answer), so waiting for it is safe; False if it does not
        finish in time.
        """
        if not self.lock.acquire(timeout=wait):
            return False
        try:
            self.stopped = True
        finally:
            self.lock.release()
        return True

    def try_stop(self) -> bool:
        """Stop the script unless a builtin is mid-exchange with the parent."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.stopped = True
        finally:
            self.lock.release()
        return True


class AsyncFailure(Exception):
    """An async main rejected; the message is the error's stack (or the rejected value)."""


_PROLOGUE = re.compile(r"""\A(?:\s|//[^\n]*\n|/\*.*?\*/)*(['"])use strict\1[ \t]*;?""", re.DOTALL)
_LOCATION = re.compile(r"\A(?:<anonymous>|function\.js|chainloom-internal):(\d+): ")


def parse_error_message(message: str, script: str, offset_first_line: int = 0) -> str:
    """`SyntaxError: ... (line N)` with the source line and caret V8 printed."""
    lines = message.rstrip("\n").split("\n")
    head = lines[0]
    found = _LOCATION.match(head)
    line_no = int(found.group(1)) if found else 0
    text = head[found.end() :] if found else head
    if line_no > script.count("\n") + 1:
        # Past the last line: the sourceURL comment we append (an unclosed brace, say).
        return f"{text} (at the end of the script)"
    out = f"{text} (line {line_no})" if line_no else text
    if len(lines) >= 3 and lines[1] and lines[2].strip().startswith("^"):
        source, caret = lines[1], lines[2]
        if line_no == 1 and offset_first_line:
            source, caret = source[offset_first_line:], caret[offset_first_line:]
        out += f"\n{source}\n{caret}"
    return out


def script_error_message(message: str) -> str:
    """The thrown value and its stack, without mini-racer's source excerpt or our frames."""
    head, _, stack = message.rstrip("\n").partition("\n\n")
    first = head.split("\n", 1)[0]
    found = _LOCATION.match(first)
    thrown = first[found.end() :] if found else first
    if not stack:
        line = f" (line {found.group(1)})" if found else ""
        return f"{thrown}{line}"
    frames = [
        line for line in stack.split("\n") if "chainloom-internal" not in line and line.strip()
    ]
    return "\n".join(frames) if frames else thrown


class Host:
    def __init__(self, config: dict[str, Any], pipe: Pipe) -> None:
        self.pipe = pipe
        self.memory_bytes = int(config["memory_mb"]) << 20
        self.prewarm = bool(config.get("prewarm", True))
        self.idle_exit = float(config.get("idle_exit", IDLE_EXIT_SECONDS))
        # Set by a run; the watchdog thread kills the process past it.
        self.rss_limit: int | None = None
        self._watch = threading.Thread(target=self._rss_watchdog, daemon=True, name="rss")

    def _rss_watchdog(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            limit = self.rss_limit
            if limit is not None and _rss_bytes() > limit:
                # V8 may be inside a C++ builtin that termination cannot interrupt; leaving
                # is the only stop that always works. The runner reports the memory limit.
                os._exit(EXIT_MEMORY)

    async def serve(self) -> None:
        isolate: Isolate | None = Isolate(self)
        self._limit_data()
        self._watch.start()
        self.pipe.write({"op": "ready", "v8": isolate.mr.v8_version if isolate else ""})
        while True:
            if isolate is None and self.prewarm:
                isolate = Isolate(self)
            # Between calls nothing needs the event loop, so the command is read right here.
            message = self.pipe.read() if self.pipe.wait_readable(self.idle_exit) else None
            if message is None:
                # The runner closed the pipe, or forgot this host: nothing more to do.
                os._exit(0)
            current = isolate or Isolate(self)
            isolate = None
            reply, retire = await self.handle(current, message)
            if not current.seal():
                retire = True
            if retire:
                # The isolate may still be spinning (a terminated microtask loop, a C++
                # builtin): answer, then leave without touching it; the runner starts anew.
                reply["retire"] = True
                self.pipe.write(reply)
                os._exit(0)
            self.pipe.write(reply)
            current.close()

    def _limit_data(self) -> None:
        # Large ArrayBuffers live outside V8's heap limit; a data-segment limit makes such an
        # allocation fail inside JS (RangeError) instead of taking gigabytes.
        allowed = _vm_data_bytes() + 2 * self.memory_bytes + (256 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_DATA, (allowed, allowed))

    async def handle(
        self, isolate: Isolate, message: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        op = message.get("op")
        timeout = float(message.get("timeout", 5.0))
        if op == "check":
            work: Any = isolate.check(str(message.get("script", "")))
        elif op == "run":
            work = isolate.execute(
                str(message.get("script", "")), str(message.get("input", "null"))
            )
        else:
            return {
                "op": "done",
                "ok": False,
                "kind": "internal",
                "error": f"unknown op {op}",
            }, False
        self.rss_limit = _rss_bytes() + self.memory_bytes + (64 << 20)
        try:
            return await self._supervise(isolate, work, timeout, message)
        finally:
            self.rss_limit = None

    async def _supervise(
        self, isolate: Isolate, work: Any, limit: float, message: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        started = time.monotonic()
        task = asyncio.ensure_future(work)
        while True:
            left = limit - isolate.js_seconds(started)
            if left <= 0 and isolate.try_stop():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 0.2)
                return self._failure(isolate, "timeout", f"{limit:g}"), True
            done, _ = await asyncio.wait({task}, timeout=max(left, WATCHDOG_INTERVAL))
            if done:
                break
        try:
            out = task.result()
        except JSOOMException:
            return self._failure(isolate, "memory", "heap"), True
        except JSParseException as err:
            # A check put "throw 0;" in front of line 1 (see Isolate.check).
            offset = (
                8
                if message.get("op") == "check"
                and not _PROLOGUE.match(str(message.get("script", "")))
                else 0
            )
            text = parse_error_message(str(err), str(message.get("script", "")), offset)
            return self._failure(isolate, "syntax", text), False
        except AsyncFailure as err:
            return self._failure(isolate, "script", _promise_message(str(err))), False
        except JSTimeoutException:
            return self._failure(isolate, "timeout", f"{limit:g}"), True
        except JSEvalException as err:
            if isolate.mr.was_hard_memory_limit_reached():
                return self._failure(isolate, "memory", "heap"), True
            return self._failure(isolate, "script", script_error_message(str(err))), False
        if message.get("op") == "check":
            return {"op": "done", "ok": True, "result": None, "logs": []}, False
        if not isinstance(out, str):
            return self._failure(isolate, "result", "the function's result is not JSON"), False
        limit = int(message.get("max_result", 1 << 20))
        if len(out) > limit:
            return self._failure(isolate, "result", f"{len(out)} > {limit}"), False
        return {"op": "done", "ok": True, "result": out, "logs": isolate.all_logs()}, False

    def _failure(self, isolate: Isolate, kind: str, error: str) -> dict[str, Any]:
        return {"op": "done", "ok": False, "kind": kind, "error": error, "logs": isolate.all_logs()}


def _promise_message(message: str) -> str:
    # A rejected promise carries the error's stack (or the rejected value) without a location.
    text = message
    frames = [line for line in text.rstrip("\n").split("\n") if "chainloom-internal" not in line]
    return "\n".join(frames)


def main() -> None:
    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"memory_mb": 128}
    # The protocol owns the original stdout; anything V8 or a library prints goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    memory_mb = int(config["memory_mb"])
    # The old generation may outgrow the hard limit a little before the limit's check runs;
    # past this size V8 aborts the process, which the runner reports as the memory limit.
    init_mini_racer(
        flags=["--single-threaded", f"--max-old-space-size={memory_mb + memory_mb // 4 + 16}"]
    )
    host = Host(config, Pipe(0, out_fd))
    asyncio.run(host.serve())
    os._exit(0)


if __name__ == "__main__":
    main()
