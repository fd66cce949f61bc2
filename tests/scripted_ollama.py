"""The Ollama half of the scripted LLM server (/api/*): chat, generate, embeddings, model
listings and pulls with progress, as the real Ollama server answers them."""

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.scripted_text import (
    Answer,
    arguments_object,
    canonical_model,
    count_tokens,
    embed_vector,
    inputs_of,
    last_user_text,
    messages_tokens,
    now_iso,
    sha_of,
    split_pieces,
)


class OllamaProtocol:
    """Mixed into ScriptedLLM; uses its rules, recording and pacing."""

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
    def _done_reason(answer: Answer) -> str:
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
                    "arguments": arguments_object(call.get("arguments")),
                }
            }
            for call in answer.tool_calls
        ]
        eval_tokens = count_tokens(answer.content) + sum(
            count_tokens(json.dumps(c["function"]["arguments"])) for c in calls
        )
        stats = self._stats(messages_tokens(messages), eval_tokens)
        done_reason = self._done_reason(answer)
        if body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if calls:
                message["tool_calls"] = calls
            return JSONResponse(
                {
                    "model": model,
                    "created_at": now_iso(),
                    "message": message,
                    "done_reason": done_reason,
                    "done": True,
                    **stats,
                }
            )
        lines: list[dict[str, Any]] = [
            {
                "model": model,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
            for piece in split_pieces(answer.content)
        ]
        if calls:
            lines.append(
                {
                    "model": model,
                    "created_at": now_iso(),
                    "message": {"role": "assistant", "content": "", "tool_calls": calls},
                    "done": False,
                }
            )
        lines.append(
            {
                "model": model,
                "created_at": now_iso(),
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
                {"model": model, "created_at": now_iso(), "response": answer.content, **final}
            )
        lines: list[dict[str, Any]] = [
            {"model": model, "created_at": now_iso(), "response": piece, "done": False}
            for piece in split_pieces(answer.content)
        ]
        lines.append({"model": model, "created_at": now_iso(), "response": "", **final})
        return self._ndjson(lines)

    async def _api_embed(self, request: Request) -> Response:
        body = await self._record(request)
        model = str(body.get("model") or "")
        if (missing := self._model_missing("ollama", model)) is not None:
            return missing
        inputs = inputs_of(body.get("input"))
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
        sha = sha_of(name)
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
        sha = sha_of(model)
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
