"""Talking to LLM backends through the official `openai` and `ollama` clients.

The clients' own retries are off: Temporal alone decides when a call is repeated, so a call
whose result is already in history is never paid for twice. Their HTTP goes through the
outbound policy (core/backends/transport.py), with CHAINLOOM_BACKEND_ALLOWLIST.

A ProviderError carries two texts: the detail (what the backend or the network said), for
administrators and logs, and `public` ("unreachable" or "refused"), for everyone else: a
backend's address is chosen by whoever created it, and upstream messages would let them read
what answers at any address they can name (docs/backends.md).
"""

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import ollama
import openai

from core.backends.transport import PolicyTransport, backend_allowlist
from core.outbound import Allowlist, OutboundError, OutboundRefused

# HTTP statuses worth another try later or on another backend.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


REFUSED = "refused"
UNREACHABLE = "unreachable"


class ProviderError(Exception):
    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        backend: str = "",
        refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.backend = backend
        self.refused = refused

    @property
    def public(self) -> str:
        """The error as a caller without manage on backends sees it."""
        word = REFUSED if self.refused else UNREACHABLE
        return f"backend {self.backend}: {word}" if self.backend else word


def public_error(detail: str) -> str:
    """What a caller without manage on backends sees of a stored backend error."""
    if not detail:
        return ""
    return REFUSED if f": {REFUSED}: " in detail else UNREACHABLE


@dataclass(frozen=True)
class BackendRef:
    """What a call needs to know about a backend (secrets are looked up, never passed in)."""

    id: str
    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)


@dataclass
class ChatAnswer:
    content: str
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def same_model(a: str, b: str) -> bool:
    """Ollama treats 'name' and 'name:latest' as one model."""
    if a == b:
        return True
    return a.removesuffix(":latest") == b.removesuffix(":latest")


class ProviderClients:
    """One client per backend, reused so HTTP connections are pooled across calls."""

    def __init__(self, timeout: float = 300.0, allowlist: "str | Allowlist | None" = None) -> None:
        self._timeout = timeout
        # None reads CHAINLOOM_BACKEND_ALLOWLIST.
        self._allowlist = backend_allowlist(allowlist)
        self._openai: dict[tuple[str, str], openai.AsyncOpenAI] = {}
        self._ollama: dict[str, ollama.AsyncClient] = {}
        self._models: dict[str, tuple[float, list[str]]] = {}

    def _openai_client(self, backend: BackendRef) -> openai.AsyncOpenAI:
        key = (backend.base_url, backend.api_key)
        client = self._openai.get(key)
        if client is None:
            transport = PolicyTransport(self._allowlist, authorization=bool(backend.api_key))
            # An httpx client: openai 1.x and 2.x use httpx, 3.x uses httpx2 and still takes
            # an httpx client (typed as httpx2's, hence Any).
            http_client: Any = httpx.AsyncClient(
                transport=transport, follow_redirects=True, timeout=self._timeout
            )
            client = openai.AsyncOpenAI(
                base_url=backend.base_url,
                api_key=backend.api_key or "not-needed",
                max_retries=0,
                timeout=self._timeout,
                http_client=http_client,
            )
            self._openai[key] = client
        return client

    def _ollama_client(self, backend: BackendRef) -> ollama.AsyncClient:
        client = self._ollama.get(backend.base_url)
        if client is None:
            client = ollama_client(backend.base_url, self._timeout, self._allowlist)
            self._ollama[backend.base_url] = client
        return client

    async def list_models(self, backend: BackendRef, max_age: float = 0.0) -> list[str]:
        cached = self._models.get(backend.id)
        if cached and max_age > 0 and time.monotonic() - cached[0] < max_age:
            return cached[1]
        try:
            if backend.type == "ollama":
                listing = await self._ollama_client(backend).list()
                names = [m.model or "" for m in listing.models]
            else:
                page = await self._openai_client(backend).models.list()
                names = [m.id for m in page.data]
        except Exception as err:
            raise classify(err, backend) from err
        self._models[backend.id] = (time.monotonic(), names)
        return names

    async def describe_models(self, backend: BackendRef) -> list[dict[str, Any]]:
        """Each served model with what the backend tells of it (seed 003 pulledModels)."""
        try:
            if backend.type == "ollama":
                listing = await self._ollama_client(backend).list()
                described: list[dict[str, Any]] = []
                for m in listing.models:
                    d = m.details
                    described.append(
                        {
                            "model": m.model or "",
                            "name": m.model or "",
                            "size": m.size or 0,
                            "digest": m.digest or "",
                            "modifiedAt": m.modified_at.isoformat() if m.modified_at else None,
                            "details": {
                                "family": d.family if d else None,
                                "format": d.format if d else None,
                                "parameterSize": d.parameter_size if d else None,
                                "quantizationLevel": d.quantization_level if d else None,
                            },
                        }
                    )
            else:
                page = await self._openai_client(backend).models.list()
                described = [{"model": m.id, "name": m.id} for m in page.data]
        except Exception as err:
            raise classify(err, backend) from err
        self._models[backend.id] = (time.monotonic(), [str(d["model"]) for d in described])
        return described

    async def delete_model(self, backend: BackendRef, model: str) -> None:
        try:
            await self._ollama_client(backend).delete(model)
        except Exception as err:
            raise classify(err, backend) from err

    def forget(self, backend_id: str) -> None:
        self._models.pop(backend_id, None)

    async def chat(
        self,
        backend: BackendRef,
        model: str,
        messages: list[dict[str, Any]],
        temperature: float | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> ChatAnswer:
        """One chat completion. `tools` are {name, description, parameters}; names such as
        "hook.tool" are sent wire-safe ("hook__tool", as OpenAI refuses dots) and mapped back."""
        wire = {wire_name(t["name"]): t["name"] for t in tools or []}
        specs = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": tool.get("description") or "",
                    "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
                },
            }
            for name, tool in zip(wire, tools or [], strict=True)
        ]
        messages = [_to_wire(m) for m in messages] if wire else messages
        try:
            if backend.type == "ollama":
                options = {"temperature": temperature} if temperature is not None else None
                reply = await self._ollama_client(backend).chat(
                    model=model,
                    messages=messages,
                    options=options,
                    stream=False,
                    tools=specs or None,
                )
                calls = [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {
                            "name": wire.get(c.function.name, c.function.name),
                            "arguments": dict(c.function.arguments or {}),
                        },
                    }
                    for i, c in enumerate(reply.message.tool_calls or [])
                ]
                return ChatAnswer(
                    content=reply.message.content or "",
                    input_tokens=reply.prompt_eval_count or 0,
                    output_tokens=reply.eval_count or 0,
                    tool_calls=calls,
                )
            kwargs: dict[str, Any] = {}
            if temperature is not None:
                kwargs["temperature"] = temperature
            if specs:
                kwargs["tools"] = specs
            completion = await self._openai_client(backend).chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                **kwargs,
            )
        except Exception as err:
            raise classify(err, backend) from err
        choice = completion.choices[0]
        calls = []
        for call in choice.message.tool_calls or []:
            dumped = call.model_dump()
            name = dumped.get("function", {}).get("name", "")
            if name in wire:
                dumped["function"]["name"] = wire[name]
            calls.append(dumped)
        usage = completion.usage
        return ChatAnswer(
            content=choice.message.content or "",
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            tool_calls=calls,
        )

    async def embed(self, backend: BackendRef, model: str, text: str) -> tuple[list[float], int]:
        """The vector and the input tokens the provider reports (0 when it reports none)."""
        try:
            if backend.type == "ollama":
                reply = await self._ollama_client(backend).embed(model=model, input=text)
                tokens = int(getattr(reply, "prompt_eval_count", None) or 0)
                return [float(x) for x in reply.embeddings[0]], tokens
            result = await self._openai_client(backend).embeddings.create(model=model, input=text)
            usage = getattr(result, "usage", None)
            tokens = int(getattr(usage, "prompt_tokens", None) or 0)
            return [float(x) for x in result.data[0].embedding], tokens
        except Exception as err:
            raise classify(err, backend) from err

    async def close(self) -> None:
        for client in self._openai.values():
            await client.close()
        self._openai.clear()
        self._ollama.clear()


def ollama_client(base_url: str, timeout: Any, allowlist: Allowlist) -> ollama.AsyncClient:
    """An ollama client under the outbound policy; it never sends a key (ollama has none)."""
    transport = PolicyTransport(allowlist, authorization=False)
    return ollama.AsyncClient(host=base_url, timeout=timeout, transport=transport)


def wire_name(name: str) -> str:
    """A tool name every provider accepts: letters, digits, _ and - only."""
    return "".join(ch if ch.isalnum() or ch in "_-" else "__" for ch in name)[:64]


def _to_wire(message: dict[str, Any]) -> dict[str, Any]:
    """Earlier tool calls in the history go back to the model under their wire names."""
    calls = message.get("tool_calls")
    out = dict(message)
    if calls:
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "name": wire_name(c["function"]["name"])}}
            for c in calls
        ]
    if message.get("role") == "tool" and message.get("name"):
        out["name"] = wire_name(str(message["name"]))
    return out


def classify(err: Exception, backend: BackendRef) -> ProviderError:
    """Sort a client error into transient (retry, fail over) or permanent (fail the task)."""
    if isinstance(err, ProviderError):
        return err
    name = backend.name
    where = f"backend {name}"
    # The openai client wraps what its transport raised (a refusal) as a connection error.
    policy = _policy_failure(err)
    if isinstance(policy, OutboundRefused):
        # Policy, not luck: the same address is refused on every try.
        return ProviderError(
            f"{where}: {policy.message}", transient=False, backend=name, refused=True
        )
    if isinstance(policy, OutboundError):
        return ProviderError(f"{where}: {policy.message}", transient=policy.transient, backend=name)
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        detail = _openai_message(err)
        return ProviderError(
            f"{where}: HTTP {status}: {detail}",
            transient=status in TRANSIENT_STATUSES,
            status=status,
            backend=name,
        )
    if isinstance(err, openai.APIConnectionError | openai.APITimeoutError):
        return ProviderError(
            f"{where}: cannot reach {backend.base_url}: {err}", transient=True, backend=name
        )
    if isinstance(err, ollama.ResponseError):
        status = err.status_code
        return ProviderError(
            f"{where}: HTTP {status}: {err.error}",
            transient=status in TRANSIENT_STATUSES or status < 0,
            status=status,
            backend=name,
        )
    if isinstance(
        err,
        httpx.TimeoutException
        | httpx.NetworkError
        | httpx.RemoteProtocolError
        | ConnectionError
        | TimeoutError,
    ):
        return ProviderError(
            f"{where}: cannot reach {backend.base_url}: {err!r}", transient=True, backend=name
        )
    return ProviderError(f"{where}: {type(err).__name__}: {err}", transient=False, backend=name)


def _policy_failure(err: BaseException) -> BaseException | None:
    """The outbound policy's refusal or DNS failure behind `err`, if that is what it is."""
    seen: BaseException | None = err
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, OutboundRefused | OutboundError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _openai_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return err.message
