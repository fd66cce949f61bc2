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
import itertools
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.scripted_ollama import OllamaProtocol
from tests.scripted_text import (
    DEFAULT_MODELS,
    PROBE_HEADER,
    Answer,
    Api,
    Matcher,
    Recorded,
    Rule,
    arguments_string,
    canonical_model,
    count_tokens,
    embed_vector,
    inputs_of,
    last_user_text,
    messages_tokens,
    prompt_text,
    split_pieces,
)

# --------------------------------------------------------------------------- server


class ScriptedLLM(OllamaProtocol):
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
    ) -> Answer | JSONResponse:
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
        return Answer(content, tool_calls, finish)

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
                    "arguments": arguments_string(call.get("arguments")),
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
        prompt_tokens = messages_tokens(messages)
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
        text = prompt_text(body.get("prompt"))
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
        inputs = inputs_of(body.get("input"))
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

    # ------------------------------------------------------------------ fallbacks

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
