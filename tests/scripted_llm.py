"""Scripted LLM server that speaks the real OpenAI and Ollama HTTP protocols.

No model weights exist on test machines, so the suite points the official ``openai`` and
``ollama`` clients (and chainloom's activities) at this server. Replies are scripted per test
with :meth:`ScriptedLLM.reply`; every request is recorded so tests can assert on what was sent.

Standalone (for manual end-to-end checks and subprocess-based tests)::

    python -m tests.scripted_llm --port 11999 --models llama3.2,qwen2.5 \
        --reply 'positive=>POSITIVE' --delay 0.2
"""

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import math
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Matcher = str | Callable[[str, dict[str, Any]], bool] | None
Api = Literal["openai", "ollama"]

# Requests carrying this header (the start-up probe) are not recorded, so tests see only theirs.
PROBE_HEADER = "x-scripted-llm-probe"
DEFAULT_MODELS = ["llama3.2", "nomic-embed-text"]
_PIECE_RE = re.compile(r"\s*\S+\s*")


@dataclass
class Recorded:
    """One request as the server saw it, so tests can assert on what clients really sent."""

    method: str
    path: str
    body: Any
    headers: dict[str, str]
    time: float

    @property
    def model(self) -> str | None:
        """Model named in the body (Ollama's legacy ``name`` too), for filtering by model."""
        if isinstance(self.body, dict):
            value = self.body.get("model") or self.body.get("name")
            return value if isinstance(value, str) else None
        return None


@dataclass
class Rule:
    """A scripted answer; rules are tried in the order they were added."""

    match: Matcher
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    delay: float = 0.0
    status: int | None = None
    times: int | None = None
    error: str = "scripted failure"
    hits: int = 0

    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, text: str, body: dict[str, Any]) -> bool:
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return self.match.lower() in text.lower()
        return bool(self.match(text, body))


@dataclass
class _Answer:
    """What a generation endpoint should say, after rules and truncation were applied."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish: str  # "stop" | "length" | "tool_calls"


# --------------------------------------------------------------------------- text helpers


def count_tokens(text: str) -> int:
    """Token count used for usage stats: whitespace-separated words (deterministic, cheap)."""
    return len(text.split())


def split_pieces(text: str) -> list[str]:
    """Split into word-sized stream chunks that concatenate back to exactly ``text``."""
    pieces = _PIECE_RE.findall(text)
    if not pieces:
        return [text] if text else []
    return pieces


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or OpenAI's list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and "text" in p]
        return "\n".join(str(p) for p in parts)
    return ""


def last_user_text(messages: Any) -> str:
    """Content of the last ``user`` message; rules match against this."""
    if not isinstance(messages, list):
        return ""
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _content_text(msg.get("content"))
    return ""


def _messages_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        count_tokens(_content_text(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def _prompt_text(prompt: Any) -> str:
    """Text of a completions ``prompt`` (string or list of strings; the last one wins)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        strings = [p for p in prompt if isinstance(p, str)]
        return strings[-1] if strings else ""
    return ""


def _inputs(value: Any) -> list[str]:
    """Embedding inputs as a list of strings (token-id lists are stringified)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [json.dumps(value)]
        return [v if isinstance(v, str) else json.dumps(v) for v in value]
    return [json.dumps(value)]


def embed_vector(text: str, dim: int) -> list[float]:
    """Deterministic unit vector from a hash of ``text``: same text, same vector."""
    values: list[float] = []
    for block in itertools.count():
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        for (word,) in struct.iter_unpack(">I", digest):
            values.append(word / 0xFFFFFFFF * 2.0 - 1.0)
        if len(values) >= dim:
            break
    values = values[:dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def canonical_model(name: str) -> str:
    """Ollama treats ``llama3.2`` and ``llama3.2:latest`` as the same model."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _sha(name: str) -> str:
    return hashlib.sha256(canonical_model(name).encode()).hexdigest()


def _arguments_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            return {"raw": arguments}
        return parsed if isinstance(parsed, dict) else {"value": parsed}
    return dict(arguments or {})


def _arguments_string(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})


# --------------------------------------------------------------------------- server


class ScriptedLLM:
    """OpenAI (/v1/*) and Ollama (/api/*) compatible fake, served by uvicorn in a thread."""

    version = "0.12.3"

    def __init__(
        self,
        models: list[str] | None = None,
        embed_dim: int = 8,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.models: list[str] = list(models) if models is not None else list(DEFAULT_MODELS)
        self.embed_dim = embed_dim
        self.host = host
        self.port = port
        self.requests: list[Recorded] = []
        # Pull simulation: ``pull_steps`` progress lines spread over ``pull_seconds``.
        self.pull_total_bytes = 100_000_000
        self.pull_seconds = 0.5
        self.pull_steps = 10
        # Names whose pull fails like a missing manifest on the real registry.
        self.unpullable: set[str] = set()
        # Delay for requests no rule answers (the CLI's --delay), and between stream chunks.
        self.default_delay = 0.0
        self.stream_chunk_delay = 0.0
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._loaded: dict[str, float] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """Base URL (what ``ollama.Client(host=...)`` takes)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` takes."""
        return f"{self.url}/v1"

    @property
    def pull_delay_per_step(self) -> float:
        return self.pull_seconds / max(self.pull_steps, 1)

    def start(self) -> "ScriptedLLM":
        """Bind a (free) port, serve in a daemon thread and block until the server answers."""
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"scripted-llm-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._wait_ready(sock)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread (open streams get ~1 s to finish)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> "ScriptedLLM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reply(
        self,
        match: Matcher,
        content: str = "",
        *,
        tool_calls: list[dict[str, Any]] | None = None,
        delay: float = 0.0,
        status: int | None = None,
        times: int | None = None,
        error: str = "scripted failure",
    ) -> None:
        """Add a rule: answer ``content``/``tool_calls`` or fail with ``status`` when matched.

        ``match``: substring of the last user message (case-insensitive), a callable
        ``(last_user_text, body) -> bool``, or None for everything. Embedding endpoints only
        consult rules that set ``status`` (text replies mean nothing there).
        """
        rule = Rule(match, content, tool_calls, delay, status, times, error)
        with self._lock:
            self._rules.append(rule)

    def reset(self) -> None:
        """Forget rules, recorded requests and loaded-model state between tests."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()
            self._loaded.clear()
            self._call_ids = itertools.count(1)

    def count(self, path: str | None = None, model: str | None = None) -> int:
        """Recorded requests, optionally only for an exact ``path`` and/or ``model``."""
        want = canonical_model(model) if model is not None else None
        total = 0
        for rec in list(self.requests):
            if path is not None and rec.path != path:
                continue
            if want is not None and (rec.model is None or canonical_model(rec.model) != want):
                continue
            total += 1
        return total

    def has_model(self, name: str) -> bool:
        want = canonical_model(name)
        return any(canonical_model(m) == want for m in list(self.models))

    # ------------------------------------------------------------------ internals

    def _wait_ready(self, sock: socket.socket, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        assert self._server is not None and self._thread is not None
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("scripted LLM server failed to start")
            time.sleep(0.01)
        while True:
            try:
                resp = httpx.get(f"{self.url}/api/version", headers={PROBE_HEADER: "1"}, timeout=2)
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("scripted LLM server does not answer")
            time.sleep(0.02)

    def _build_app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._v1_chat, methods=["POST"]),
            Route("/v1/completions", self._v1_completions, methods=["POST"]),
            Route("/v1/embeddings", self._v1_embeddings, methods=["POST"]),
            Route("/v1/models", self._v1_models, methods=["GET"]),
            Route("/api/chat", self._api_chat, methods=["POST"]),
            Route("/api/generate", self._api_generate, methods=["POST"]),
            Route("/api/embed", self._api_embed, methods=["POST"]),
            Route("/api/embeddings", self._api_embeddings, methods=["POST"]),
            Route("/api/tags", self._api_tags, methods=["GET"]),
            Route("/api/show", self._api_show, methods=["POST"]),
            Route("/api/delete", self._api_delete, methods=["DELETE"]),
            Route("/api/version", self._api_version, methods=["GET"]),
            Route("/api/ps", self._api_ps, methods=["GET"]),
            Route("/api/pull", self._api_pull, methods=["POST"]),
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route(
                "/{rest:path}",
                self._not_found,
                methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"],
            ),
        ]
        return Starlette(routes=routes)

    async def _record(self, request: Request) -> dict[str, Any]:
        """Parse the JSON body (if any) and record the request; returns a dict body."""
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if PROBE_HEADER not in request.headers:
            self.requests.append(
                Recorded(request.method, request.url.path, body, dict(request.headers), time.time())
            )
        return body if isinstance(body, dict) else {}

    def _pick(self, text: str, body: dict[str, Any], *, status_only: bool = False) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.exhausted() or (status_only and rule.status is None):
                    continue
                if rule.matches(text, body):
                    rule.hits += 1
                    return rule
        return None

    @staticmethod
    def _error(api: Api, status: int, message: str, *, code: Any = None) -> JSONResponse:
        if api == "ollama":
            return JSONResponse({"error": message}, status_code=status)
        payload = {
            "message": message,
            "type": "server_error",
            "code": status if code is None else code,
        }
        return JSONResponse({"error": payload}, status_code=status)

    def _model_missing(self, api: Api, model: str) -> JSONResponse | None:
        if model and self.has_model(model):
            self._loaded[canonical_model(model)] = time.time()
            return None
        if api == "ollama":
            return JSONResponse(
                {"error": f'model "{model}" not found, try pulling it first'}, status_code=404
            )
        err = {
            "message": f"model '{model}' not found",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
        return JSONResponse({"error": err}, status_code=404)

    async def _script(
        self,
        api: Api,
        text: str,
        body: dict[str, Any],
        max_tokens: int | None,
        *,
        allow_tools: bool = True,
    ) -> _Answer | JSONResponse:
        """Apply the first matching rule (or echo): wait, fail, or build the answer."""
        rule = self._pick(text, body)
        delay = rule.delay if rule is not None else self.default_delay
        if delay > 0:
            await asyncio.sleep(delay)
        if rule is not None and rule.status is not None:
            return self._error(api, rule.status, rule.error)
        content = rule.content if rule is not None else f"echo: {text}"
        tool_calls = list(rule.tool_calls or []) if rule is not None and allow_tools else []
        finish = "tool_calls" if tool_calls else "stop"
        if max_tokens is not None and max_tokens >= 0:
            pieces = split_pieces(content)
            if len(pieces) > max_tokens:
                content = "".join(pieces[:max_tokens]).rstrip()
                finish = "length"
        return _Answer(content, tool_calls, finish)

    async def _paced(self, items: Iterable[str]) -> AsyncIterator[str]:
        for i, item in enumerate(items):
            if i and self.stream_chunk_delay > 0:
                await asyncio.sleep(self.stream_chunk_delay)
            yield item

    # ------------------------------------------------------------------ OpenAI

    def _openai_tool_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{next(self._call_ids)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": _arguments_string(call.get("arguments")),
                },
            }
            for call in calls
        ]

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _sse(self, chunks: list[dict[str, Any]]) -> StreamingResponse:
        lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        return StreamingResponse(
            self._paced(lines),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def _v1_chat(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("openai", model)) is not None:
            return missing
        messages = body.get("messages")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        answer = await self._script("openai", last_user_text(messages), body, max_tokens)
        if isinstance(answer, JSONResponse):
            return answer
        calls = self._openai_tool_calls(answer.tool_calls)
        prompt_tokens = _messages_tokens(messages)
        completion_tokens = count_tokens(answer.content) + sum(
            count_tokens(c["function"]["arguments"]) for c in calls
        )
        usage = self._usage(prompt_tokens, completion_tokens)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": answer.content if answer.content or not calls else None,
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = calls
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_scripted",
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": answer.finish,
                        }
                    ],
                    "usage": usage,
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_scripted",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                out["usage"] = None
            return out

        first_content: str | None = "" if answer.content or not calls else None
        chunks = [chunk({"role": "assistant", "content": first_content, "refusal": None})]
        chunks += [chunk({"content": piece}) for piece in split_pieces(answer.content)]
        for index, call in enumerate(calls):
            head = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            chunks.append(chunk({"tool_calls": [head]}))
            args = call["function"]["arguments"]
            half = len(args) // 2
            for part in (args[:half], args[half:]):
                if part:
                    delta = {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
                    chunks.append(chunk(delta))
        chunks.append(chunk({}, answer.finish))
        if include_usage:
            final = chunk({})
            final["choices"] = []
            final["usage"] = usage
            chunks.append(final)
        return self._sse(chunks)

    async def _v1_completions(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("openai", model)) is not None:
            return missing
        text = _prompt_text(body.get("prompt"))
        answer = await self._script("openai", text, body, body.get("max_tokens"), allow_tools=False)
        if isinstance(answer, JSONResponse):
            return answer
        usage = self._usage(count_tokens(text), count_tokens(answer.content))
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def completion(text_part: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_scripted",
                "choices": [
                    {"text": text_part, "index": 0, "logprobs": None, "finish_reason": finish}
                ],
            }

        if not body.get("stream"):
            return JSONResponse({**completion(answer.content, answer.finish), "usage": usage})
        chunks = [completion(piece, None) for piece in split_pieces(answer.content)]
        chunks.append(completion("", answer.finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            final = completion("", None)
            final["choices"] = []
            final["usage"] = usage
            chunks.append(final)
        return self._sse(chunks)

    async def _v1_embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("openai", model)) is not None:
            return missing
        inputs = _inputs(body.get("input"))
        if (failure := await self._embed_failure("openai", inputs, body)) is not None:
            return failure
        dim = int(body.get("dimensions") or self.embed_dim)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = embed_vector(text, dim)
            embedding: Any = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(count_tokens(t) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _embed_failure(
        self, api: Api, inputs: list[str], body: dict[str, Any]
    ) -> JSONResponse | None:
        rule = self._pick("\n".join(inputs), body, status_only=True)
        if rule is None:
            if self.default_delay > 0:
                await asyncio.sleep(self.default_delay)
            return None
        if rule.delay > 0:
            await asyncio.sleep(rule.delay)
        assert rule.status is not None
        return self._error(api, rule.status, rule.error)

    async def _v1_models(self, request: Request) -> Response:
        await self._record(request)
        data = [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "library"}
            for name in list(self.models)
        ]
        return JSONResponse({"object": "list", "data": data})

    # ------------------------------------------------------------------ Ollama

    @staticmethod
    def _stats(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        return {
            "total_duration": 1_000_000 * (1 + prompt_tokens + eval_tokens),
            "load_duration": 100_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 100_000 * (1 + prompt_tokens),
            "eval_count": eval_tokens,
            "eval_duration": 1_000_000 * (1 + eval_tokens),
        }

    def _ndjson(self, lines: list[dict[str, Any]]) -> StreamingResponse:
        encoded = [json.dumps(line) + "\n" for line in lines]
        return StreamingResponse(self._paced(encoded), media_type="application/x-ndjson")

    @staticmethod
    def _num_predict(body: dict[str, Any]) -> int | None:
        options = body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int):
            value: int = options["num_predict"]
            return value if value >= 0 else None
        return None

    @staticmethod
    def _done_reason(answer: _Answer) -> str:
        return "length" if answer.finish == "length" else "stop"

    async def _api_chat(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("ollama", model)) is not None:
            return missing
        messages = body.get("messages")
        answer = await self._script(
            "ollama", last_user_text(messages), body, self._num_predict(body)
        )
        if isinstance(answer, JSONResponse):
            return answer
        calls = [
            {
                "function": {
                    "name": call["name"],
                    "arguments": _arguments_object(call.get("arguments")),
                }
            }
            for call in answer.tool_calls
        ]
        eval_tokens = count_tokens(answer.content) + sum(
            count_tokens(json.dumps(c["function"]["arguments"])) for c in calls
        )
        stats = self._stats(_messages_tokens(messages), eval_tokens)
        done_reason = self._done_reason(answer)
        if body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if calls:
                message["tool_calls"] = calls
            return JSONResponse(
                {
                    "model": model,
                    "created_at": _now_iso(),
                    "message": message,
                    "done_reason": done_reason,
                    "done": True,
                    **stats,
                }
            )
        lines: list[dict[str, Any]] = [
            {
                "model": model,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
            for piece in split_pieces(answer.content)
        ]
        if calls:
            lines.append(
                {
                    "model": model,
                    "created_at": _now_iso(),
                    "message": {"role": "assistant", "content": "", "tool_calls": calls},
                    "done": False,
                }
            )
        lines.append(
            {
                "model": model,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": done_reason,
                "done": True,
                **stats,
            }
        )
        return self._ndjson(lines)

    async def _api_generate(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("ollama", model)) is not None:
            return missing
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        answer = await self._script(
            "ollama", prompt, body, self._num_predict(body), allow_tools=False
        )
        if isinstance(answer, JSONResponse):
            return answer
        stats = self._stats(count_tokens(prompt), count_tokens(answer.content))
        final = {
            "done": True,
            "done_reason": self._done_reason(answer),
            "context": [1, 2, 3],
            **stats,
        }
        if body.get("stream") is False:
            return JSONResponse(
                {"model": model, "created_at": _now_iso(), "response": answer.content, **final}
            )
        lines: list[dict[str, Any]] = [
            {"model": model, "created_at": _now_iso(), "response": piece, "done": False}
            for piece in split_pieces(answer.content)
        ]
        lines.append({"model": model, "created_at": _now_iso(), "response": "", **final})
        return self._ndjson(lines)

    async def _api_embed(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("ollama", model)) is not None:
            return missing
        inputs = _inputs(body.get("input"))
        if (failure := await self._embed_failure("ollama", inputs, body)) is not None:
            return failure
        dim = int(body.get("dimensions") or self.embed_dim)
        tokens = sum(count_tokens(t) for t in inputs)
        return JSONResponse(
            {
                "model": model,
                "embeddings": [embed_vector(t, dim) for t in inputs],
                "total_duration": 1_000_000,
                "load_duration": 100_000,
                "prompt_eval_count": tokens,
            }
        )

    async def _api_embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("ollama", model)) is not None:
            return missing
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        if (failure := await self._embed_failure("ollama", [prompt], body)) is not None:
            return failure
        return JSONResponse({"embedding": embed_vector(prompt, self.embed_dim)})

    def _model_entry(self, name: str) -> dict[str, Any]:
        sha = _sha(name)
        return {
            "name": canonical_model(name),
            "model": canonical_model(name),
            "modified_at": "2025-01-01T00:00:00Z",
            "size": self.pull_total_bytes,
            "digest": sha,
            "details": self._details(name),
        }

    @staticmethod
    def _details(name: str) -> dict[str, Any]:
        family = re.split(r"[^a-z]", name.lower(), maxsplit=1)[0] or "llama"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        }

    async def _api_tags(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"models": [self._model_entry(m) for m in list(self.models)]})

    async def _api_show(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or body.get("name") or "")
        if not self.has_model(model):
            return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
        family = self._details(model)["family"]
        return JSONResponse(
            {
                "modelfile": f"FROM {canonical_model(model)}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._details(model),
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": 3_212_749_888,
                    f"{family}.context_length": 131072,
                    f"{family}.embedding_length": self.embed_dim,
                },
                "capabilities": ["completion", "tools", "embedding"],
                "modified_at": "2025-01-01T00:00:00Z",
            }
        )

    async def _api_delete(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or body.get("name") or "")
        if not self.has_model(model):
            return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
        want = canonical_model(model)
        self.models[:] = [m for m in self.models if canonical_model(m) != want]
        self._loaded.pop(want, None)
        return Response(status_code=200)

    async def _api_version(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"version": self.version})

    async def _api_ps(self, request: Request) -> Response:
        await self._record(request)
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        running = [
            {
                **self._model_entry(name),
                "expires_at": expires,
                "size_vram": self.pull_total_bytes,
                "context_length": 4096,
            }
            for name in list(self.models)
            if canonical_model(name) in self._loaded
        ]
        return JSONResponse({"models": running})

    async def _pull_progress(self, model: str, request: Request) -> AsyncIterator[dict[str, Any]]:
        """Real Ollama pull sequence; the model is added only if the client is still there."""
        yield {"status": "pulling manifest"}
        if model in self.unpullable or canonical_model(model) in self.unpullable:
            yield {"error": "pull model manifest: file does not exist"}
            return
        sha = _sha(model)
        total = self.pull_total_bytes
        steps = max(self.pull_steps, 1)
        for step in range(1, steps + 1):
            await asyncio.sleep(self.pull_delay_per_step)
            if await request.is_disconnected():
                return
            yield {
                "status": f"pulling {sha[:12]}",
                "digest": f"sha256:{sha}",
                "total": total,
                "completed": total * step // steps,
            }
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        if await request.is_disconnected():
            return
        if not self.has_model(model):
            self.models.append(model)
        yield {"status": "success"}

    async def _api_pull(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or body.get("name") or "")
        if not model:
            return JSONResponse({"error": "model is required"}, status_code=400)
        progress = self._pull_progress(model, request)
        if body.get("stream") is False:
            last: dict[str, Any] = {}
            async for line in progress:
                if "error" in line:
                    return JSONResponse(line, status_code=500)
                last = line
            if last.get("status") != "success":
                return JSONResponse({"error": "client disconnected"}, status_code=499)
            return JSONResponse({"status": "success"})

        async def lines() -> AsyncIterator[str]:
            async for line in progress:
                yield json.dumps(line) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _root(self, request: Request) -> Response:
        return Response("Ollama is running", media_type="text/plain")

    async def _not_found(self, request: Request) -> Response:
        await self._record(request)
        return Response("404 page not found", status_code=404, media_type="text/plain")


# --------------------------------------------------------------------------- CLI


def parse_reply(spec: str) -> tuple[str | None, str]:
    """``'MATCH=>CONTENT'``; an empty MATCH matches every request."""
    match, sep, content = spec.partition("=>")
    if not sep:
        raise argparse.ArgumentTypeError(f"--reply must look like MATCH=>CONTENT, got {spec!r}")
    return (match or None), content


def main(argv: list[str] | None = None) -> None:
    """Run in the foreground until Ctrl-C (uvicorn handles the signal in the main thread)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11999)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--embed-dim", type=int, default=8)
    parser.add_argument("--reply", action="append", default=[], type=parse_reply)
    parser.add_argument("--delay", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--pull-seconds", type=float, default=0.5)
    parser.add_argument("--pull-total-bytes", type=int, default=100_000_000)
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    llm = ScriptedLLM(models, args.embed_dim, host=args.host, port=args.port)
    llm.default_delay = args.delay
    llm.pull_seconds = args.pull_seconds
    llm.pull_total_bytes = args.pull_total_bytes
    for match, content in args.reply:
        llm.reply(match, content, delay=args.delay)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    llm.port = sock.getsockname()[1]
    # Listen before announcing: connections then wait in the backlog until uvicorn accepts.
    sock.listen(128)
    print(f"scripted LLM listening on {llm.url} (models: {', '.join(models)})", flush=True)
    config = uvicorn.Config(
        llm.app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        pass


if __name__ == "__main__":
    main()
