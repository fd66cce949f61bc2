"""Deterministic pieces of the interpreter: parsing model answers, transitions, compose.

Everything here runs inside the Temporal workflow, so it must stay pure: no I/O, no clock,
no randomness.
"""

import json
import re
from typing import Any

from chains.spec import TERM_END, TaskTransition

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_INT = re.compile(r"[-+]?\d+")
_RANGE = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*(?:-|–|to|\.\.)\s*([-+]?\d+(?:\.\d+)?)")


class TaskFailure(Exception):
    """A task could not produce an output; on_failure or retry_on_failure may take over."""


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return format_number(value)
    if is_chat_history(value):
        messages = value.get("messages") or []
        return str(messages[-1].get("content") or "") if messages else ""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def format_number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if is_chat_history(value):
        return "chat_history"
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return "vector"
    if value is None:
        return "any"
    return "json"


def is_chat_history(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("messages"), list)


def _clean_answer(text: str) -> str:
    # Models wrap one-word answers in quotes, backticks or a trailing full stop.
    return text.strip().strip("`'\"*").strip().rstrip(".!").strip().strip("`'\"*").lower()


def parse_condition(answer: str, valid_conditions: dict[str, bool]) -> bool:
    cleaned = _clean_answer(answer)
    lowered = {key.lower(): value for key, value in valid_conditions.items()}
    if cleaned in lowered:
        return bool(lowered[cleaned])
    # A model that answers "Positive. The customer is happy." still named one key first.
    first = re.split(r"[\s,.;:!]+", cleaned, maxsplit=1)[0] if cleaned else ""
    if first in lowered:
        return bool(lowered[first])
    allowed = ", ".join(sorted(valid_conditions))
    raise TaskFailure(
        f"answer {answer.strip()[:200]!r} is not one of the valid conditions: {allowed}"
    )


def parse_int(answer: str) -> int:
    match = _INT.search(answer)
    if not match:
        raise TaskFailure(f"expected an integer, the model answered {answer.strip()[:200]!r}")
    return int(match.group())


def parse_float(answer: str) -> float:
    match = _NUMBER.search(answer)
    if not match:
        raise TaskFailure(f"expected a number, the model answered {answer.strip()[:200]!r}")
    return float(match.group())


def parse_range(answer: str) -> str:
    match = _RANGE.search(answer)
    if match:
        low, high = float(match.group(1)), float(match.group(2))
        return f"{format_number(min(low, high))}-{format_number(max(low, high))}"
    return format_number(parse_float(answer))


def parse_bounds(text: str) -> tuple[float, float]:
    match = _RANGE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a range like '1-5'")
    low, high = float(match.group(1)), float(match.group(2))
    return min(low, high), max(low, high)


def interpret_answer(handler: str, answer: str, valid_conditions: dict[str, bool]) -> Any:
    """Turn a model's text answer into the typed output of a prompt handler."""
    if handler == "prompt_to_condition":
        return parse_condition(answer, valid_conditions)
    if handler == "prompt_to_int":
        return parse_int(answer)
    if handler == "prompt_to_float":
        return parse_float(answer)
    if handler == "prompt_to_range":
        return parse_range(answer)
    return answer.strip()


def _number_of(value: str) -> float:
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        if _RANGE.fullmatch(text):
            low, high = parse_bounds(text)
            return (low + high) / 2
        raise


def branch_matches(operator: str, when: str, value: str) -> bool:
    if operator == "default":
        return True
    if operator == "equals":
        return value.strip().lower() == when.strip().lower()
    if operator == "contains":
        return when.lower() in value.lower()
    if operator == "starts_with":
        return value.strip().lower().startswith(when.lower())
    if operator == "ends_with":
        return value.strip().lower().endswith(when.lower())
    try:
        number = _number_of(value)
    except ValueError:
        return False
    if operator == "gt":
        return number > float(when)
    if operator == "lt":
        return number < float(when)
    if operator == "in_range":
        low, high = parse_bounds(when)
        return low <= number <= high
    raise ValueError(f"unknown operator {operator!r}")


def next_task(transition: TaskTransition, value: str) -> str | None:
    """The goto target for a transition value: a task id, TERM_END, or None if nothing matched.

    A task with no branches ends the chain. `default` branches are tried last, wherever they
    stand, so authors need not order them.
    """
    if not transition.branches:
        return TERM_END
    defaults = [b for b in transition.branches if b.operator == "default"]
    for branch in transition.branches:
        if branch.operator != "default" and branch_matches(branch.operator, branch.when, value):
            return branch.goto or TERM_END
    if defaults:
        return defaults[0].goto or TERM_END
    return None


def parse_command(text: str) -> dict[str, Any]:
    stripped = text.strip()
    if not stripped.startswith("/"):
        return {"command": "", "args": [], "text": stripped}
    parts = stripped[1:].split()
    return {"command": parts[0] if parts else "", "args": parts[1:], "text": stripped}


def parse_key_value(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip().lstrip("-*").strip()
        if not line:
            continue
        for sep in ("=", ":"):
            if sep in line:
                key, _, val = line.partition(sep)
                key = key.strip().strip("`'\"*")
                if key:
                    result[key] = val.strip().strip("`'\"")
                break
    if not result:
        raise TaskFailure("no key=value or key: value pairs found in the input")
    return result


def to_chat_history(value: Any) -> dict[str, Any]:
    if is_chat_history(value):
        return {**value, "messages": [dict(m) for m in value["messages"]]}
    return {"messages": [{"role": "user", "content": as_text(value)}]}


def compose(output: Any, with_value: Any, strategy: str | None) -> Any:
    """Merge a task's output with another variable (the task's `compose` block)."""
    both_histories = is_chat_history(output) and is_chat_history(with_value)
    strategy = strategy or ("merge_chat_histories" if both_histories else "override")
    if strategy == "merge_chat_histories":
        if not both_histories:
            raise TaskFailure("merge_chat_histories needs two chat histories")
        merged = to_chat_history(output)
        merged["messages"] = merged["messages"] + [dict(m) for m in with_value["messages"]]
        return merged
    if strategy == "append_string_to_chat_history":
        if is_chat_history(with_value) and not is_chat_history(output):
            history = to_chat_history(with_value)
            history["messages"].append({"role": "assistant", "content": as_text(output)})
            return history
        if is_chat_history(output):
            history = to_chat_history(output)
            history["messages"].append({"role": "user", "content": as_text(with_value)})
            return history
        raise TaskFailure("append_string_to_chat_history needs a chat history on one side")
    # override: the task's output wins; objects are merged key by key.
    if isinstance(output, dict) and isinstance(with_value, dict):
        return {**with_value, **output}
    return with_value if output is None else output


def openai_chat_response(history: dict[str, Any], response_id: str, created: int) -> dict[str, Any]:
    messages = history.get("messages") or []
    last = next((m for m in reversed(messages) if m.get("role") == "assistant"), None)
    if last is None:
        raise TaskFailure("the chat history has no assistant message to convert")
    message: dict[str, Any] = {"role": "assistant", "content": last.get("content") or ""}
    if last.get("tool_calls"):
        message["tool_calls"] = last["tool_calls"]
    prompt_tokens = int(history.get("inputTokens") or 0)
    completion_tokens = int(history.get("outputTokens") or 0)
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": history.get("model") or "",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if last.get("tool_calls") else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def payload_size(value: Any) -> int:
    """Bytes `value` takes as a Temporal payload (the SDK's JSON: compact, ASCII-escaped)."""
    return len(json.dumps(value, separators=(",", ":"), default=str))


# What a unit's large fields become when a run's state must shrink to fit a payload.
_BULKY = ("input", "output", "transition", "print", "debug", "error")


def _field_size(value: Any) -> int:
    if isinstance(value, str) and value.isascii():
        return len(value) + 2  # cheap, and exact unless it holds quotes or control characters
    return payload_size(value)


def trim_state(state: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """`state` with its largest fields replaced by a note until it fits in `max_bytes`, and
    then, if that is not enough, only its latest units.

    A failed run hands its state back in the failure's details; a state larger than
    Temporal's payload limit would make that failure itself impossible to record.
    """
    if payload_size(state) <= max_bytes:
        return state
    fields = sorted(
        (
            (_field_size(unit[name]), index, name)
            for index, unit in enumerate(state)
            for name in _BULKY
            if name in unit
        ),
        reverse=True,
    )
    trimmed = [dict(unit) for unit in state]
    total = payload_size(state)
    for size, index, name in fields:
        if total <= max_bytes or size <= 64:
            break
        trimmed[index][name] = f"[{size} bytes left out: the run's state was too large]"
        total -= size - 70
    if total <= max_bytes:
        return trimmed
    # Many small units (a long loop): keep the latest ones, which led to the failure.
    kept: list[dict[str, Any]] = []
    room = max_bytes
    for unit in reversed(trimmed):
        room -= payload_size(unit) + 1
        if room < 0:
            break
        kept.append(unit)
    return kept[::-1]
