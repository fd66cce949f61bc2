"""The scripted LLM server's data and text helpers (see tests/scripted_llm.py)."""

import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

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
class Answer:
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


def messages_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(
        count_tokens(_content_text(m.get("content"))) for m in messages if isinstance(m, dict)
    )


def prompt_text(prompt: Any) -> str:
    """Text of a completions ``prompt`` (string or list of strings; the last one wins)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        strings = [p for p in prompt if isinstance(p, str)]
        return strings[-1] if strings else ""
    return ""


def inputs_of(value: Any) -> list[str]:
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


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def sha_of(name: str) -> str:
    return hashlib.sha256(canonical_model(name).encode()).hexdigest()


def arguments_object(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            return {"raw": arguments}
        return parsed if isinstance(parsed, dict) else {"value": parsed}
    return dict(arguments or {})


def arguments_string(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments or {})
