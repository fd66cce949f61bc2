"""Values too large for Temporal history: handles, sizes, chat-history compaction, batching.

Pure and deterministic: ChainWorkflow uses it to decide what leaves history, the activities
that write and read a run's records and the API use it to read handles back.

A value stored in the run's records (table `run_record`) is referred to by a handle::

    {"$stored": {"workflow": "chain-x-…", "seq": 7, "bytes": 5242880, "type": "string"}}

and a stored run of chat messages by a placeholder message inside a history's `messages`::

    {"role": "history", "$stored": {"workflow": …, "seq": 8, "bytes": 81234, "messages": 40}}

which readers splice back in place. `bytes` is the size of the value as JSON once read back
in full (placeholders inside it expanded). A placeholder's role is "system" when the messages
it stands for hold a system message, so code asking "is there a system message?" of a
compacted history gets the answer it would get of the whole one.
"""

import json
from typing import Any

from chains import engine
from workflows.types import StoredRecord

MARK = "$stored"

# One store call carries at most this much JSON, under Temporal's 512 KiB payload warning;
# a record larger than a part is cut into parts of its JSON text (`part` 0, 1, …) that the
# reader joins again.
BATCH_BYTES = 500 * 1024
PART_BYTES = 240 * 1024
# The largest stored value a workflow reads back into itself (one activity result), well
# under Temporal's 2 MiB payload limit.
READ_LIMIT = 1 << 20


def size_of(value: Any) -> int:
    """Bytes of `value` as Temporal's JSON converter writes it (ASCII, compact)."""
    return len(json.dumps(value, separators=(",", ":"), default=str))


def handle(workflow_id: str, seq: int, size: int, kind: str) -> dict[str, Any]:
    return {MARK: {"workflow": workflow_id, "seq": seq, "bytes": size, "type": kind}}


def is_handle(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARK), dict)


def is_placeholder(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get(MARK), dict)
        and "messages" in message[MARK]
    )


def is_ref(value: Any) -> bool:
    """A handle or a placeholder: something a reader replaces by what it stands for."""
    return is_handle(value) or is_placeholder(value)


def placeholders(value: Any) -> list[dict[str, Any]]:
    if engine.is_chat_history(value):
        return [m for m in value["messages"] if is_placeholder(m)]
    return []


def has_stored(value: Any) -> bool:
    return is_handle(value) or bool(placeholders(value))


def ref_bytes(ref: dict[str, Any]) -> int:
    return int(ref[MARK].get("bytes") or 0)


def type_of(value: Any) -> str:
    if is_handle(value):
        return str(value[MARK].get("type") or "json")
    return engine.value_type(value)


def text_of(value: Any) -> Any:
    """A state unit's text of a value (`input`, `transition`): as_text, or the handle itself,
    which readers turn into the text of the value it stands for."""
    return value if is_handle(value) else engine.as_text(value)


def ref_key(ref: dict[str, Any]) -> tuple[str, int]:
    meta = ref[MARK]
    return str(meta.get("workflow") or ""), int(meta.get("seq") or 0)


# --------------------------------------------------------------------------- chat histories


def _shape(items: list[Any]) -> tuple[int, int]:
    """(messages, bytes) of a message list once its placeholders are expanded."""
    count = total = inner_commas = 0
    for item in items:
        if is_placeholder(item):
            n = int(item[MARK]["messages"])
            count += n
            total += ref_bytes(item) - 2
            inner_commas += max(n - 1, 0)
        else:
            count += 1
            total += size_of(item)
    return count, 2 + total + max(count - 1, 0) - inner_commas


def split_history(history: dict[str, Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """(leading system messages, the middle to store, the last message) of a history.

    The leading system messages stay (chat tasks look for one), the last message stays
    (as_text, transitions and tool calls read it); the middle, earlier placeholders included,
    becomes one new record, so a history that keeps growing is a linked list of bounded
    records.
    """
    messages = list(history["messages"])
    lead = 0
    while (
        lead < len(messages) - 1
        and not is_placeholder(messages[lead])
        and messages[lead].get("role") == "system"
    ):
        lead += 1
    return messages[:lead], messages[lead:-1], messages[-1:]


def placeholder(workflow_id: str, seq: int, middle: list[Any]) -> dict[str, Any]:
    count, size = _shape(middle)
    system = any(isinstance(m, dict) and m.get("role") == "system" for m in middle)
    return {
        "role": "system" if system else "history",
        MARK: {"workflow": workflow_id, "seq": seq, "bytes": size, "messages": count},
    }


# --------------------------------------------------------------------------- store batches


def records_of(kind: str, seq: int, data: Any) -> list[StoredRecord]:
    """One record, or its JSON text in parts when it would not fit a store call."""
    if size_of(data) <= PART_BYTES:
        return [StoredRecord(kind=kind, seq=seq, data=data)]
    text = json.dumps(data, separators=(",", ":"), default=str)
    parts: list[StoredRecord] = []
    start = 0
    while start < len(text):
        piece = text[start : start + PART_BYTES]
        # Escaping can make a piece's own JSON larger than the piece (quotes, controls).
        while size_of(piece) > PART_BYTES and len(piece) > 1:
            piece = piece[: len(piece) // 2]
        parts.append(StoredRecord(kind=kind, seq=seq, text=piece, part=len(parts)))
        start += len(piece)
    return parts


def batches(records: list[StoredRecord]) -> list[list[StoredRecord]]:
    """Records grouped so that no store call carries more than BATCH_BYTES."""
    out: list[list[StoredRecord]] = []
    current: list[StoredRecord] = []
    used = 0
    for record in records:
        size = size_of(record.data) + size_of(record.text) + 64
        if current and used + size > BATCH_BYTES:
            out.append(current)
            current, used = [], 0
        current.append(record)
        used += size
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------- cache


class Cache:
    """Values read back (or stored) by this run, by record, up to `budget` bytes;
    the oldest go first. Its content follows from history alone, so replay sees the same."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: dict[tuple[str, int], tuple[Any, int, dict[str, Any]]] = {}
        self._bytes = 0

    def get(self, key: tuple[str, int]) -> tuple[bool, Any]:
        item = self._items.get(key)
        return (True, item[0]) if item is not None else (False, None)

    def put(self, ref: dict[str, Any], value: Any, size: int) -> None:
        key = ref_key(ref)
        if size > self.budget or key in self._items:
            return
        self._items[key] = (value, size, ref)
        self._bytes += size
        while self._bytes > self.budget:
            oldest = next(iter(self._items))
            self._bytes -= self._items.pop(oldest)[1]

    def ref_of(self, value: Any) -> dict[str, Any] | None:
        """The handle of a value in hand that was read from (or stored as) a record."""
        for held, _, ref in self._items.values():
            if held is value and is_handle(ref):
                return ref
        return None
