"""A chain run's records: its finished state units and the values too large for Temporal
history (docs/chains.md, "Long and large chains").

Workflows write them through the `run_store` activity and read values back through
`run_load`; the JS and hook activities store a large result themselves; the API reads units
and values to show a whole run. Every read is filtered by tenant.
"""

import json
from collections.abc import Callable
from typing import Any

from sqlmodel import col, delete, select

from chains import engine
from core.db import Database
from core.models import RunRecordRow
from workflows import values
from workflows.types import StoreAs, StoredRecord

UNIT = "unit"
VALUE = "value"


class StoredValueError(Exception):
    """A handle whose record is missing (or belongs to another tenant)."""


def write(db: Database, tenant_id: str, workflow_id: str, records: list[StoredRecord]) -> None:
    """Write records, replacing any with the same number: a retried store writes them again,
    and an activity that stores its own result may produce another one on a retry."""
    if not records:
        return
    groups: dict[tuple[str, int], list[int]] = {}
    for record in records:
        groups.setdefault((record.kind, record.part), []).append(record.seq)
    with db.session() as session:
        for (kind, part), seqs in groups.items():
            session.exec(
                delete(RunRecordRow).where(
                    col(RunRecordRow.workflow_id) == workflow_id,
                    col(RunRecordRow.kind) == kind,
                    col(RunRecordRow.part) == part,
                    col(RunRecordRow.seq).in_(seqs),
                )
            )
        session.add_all(
            RunRecordRow(
                workflow_id=workflow_id,
                kind=r.kind,
                seq=r.seq,
                part=r.part,
                tenant_id=tenant_id,
                data=r.text if r.text else json.dumps(r.data, separators=(",", ":")),
            )
            for r in records
        )
        session.commit()


def _texts(
    db: Database, tenant_id: str, workflow_id: str, kind: str, seqs: list[int]
) -> dict[int, str]:
    query = (
        select(RunRecordRow.seq, RunRecordRow.data)
        .where(
            RunRecordRow.tenant_id == tenant_id,
            RunRecordRow.workflow_id == workflow_id,
            RunRecordRow.kind == kind,
        )
        .order_by(col(RunRecordRow.seq), col(RunRecordRow.part))
    )
    if len(seqs) < 500:
        query = query.where(col(RunRecordRow.seq).in_(seqs))
    else:
        query = query.where(col(RunRecordRow.seq) >= min(seqs), col(RunRecordRow.seq) <= max(seqs))
    found: dict[int, list[str]] = {}
    with db.session() as session:
        for seq, data in session.exec(query):
            found.setdefault(seq, []).append(data)
    return {seq: "".join(parts) for seq, parts in found.items()}


def read_units(db: Database, tenant_id: str, workflow_id: str, count: int) -> list[dict[str, Any]]:
    """State units 0..count-1 of a run, in order."""
    if count <= 0:
        return []
    texts = _texts(db, tenant_id, workflow_id, UNIT, list(range(count)))
    missing = [seq for seq in range(count) if seq not in texts]
    if missing:
        raise StoredValueError(
            f"run {workflow_id!r} lacks {len(missing)} stored state units (first: {missing[0]})"
        )
    return [json.loads(texts[seq]) for seq in range(count)]


def read_value(db: Database, tenant_id: str, workflow_id: str, seq: int) -> Any:
    texts = _texts(db, tenant_id, workflow_id, VALUE, [seq])
    if seq not in texts:
        raise StoredValueError(f"stored value {seq} of {workflow_id!r} does not exist")
    return json.loads(texts[seq])


class Reader:
    """Replaces handles and placeholders in a value by what they stand for, reading each
    record once. With a byte `budget`, refs past it stay as they are (passed through
    `on_skip`, which may decorate them), so a view of a huge run stays bounded. A lenient
    reader (for views) leaves a ref it cannot read in place, marked "missing", instead of
    raising: a run's input may hold anything its caller sent."""

    def __init__(
        self,
        db: Database,
        tenant_id: str,
        budget: int | None = None,
        on_skip: Callable[[dict[str, Any]], Any] | None = None,
        lenient: bool = False,
    ) -> None:
        self.db = db
        self.tenant_id = tenant_id
        self.budget = budget
        self.on_skip = on_skip
        self.lenient = lenient
        self._read: dict[tuple[str, int], Any] = {}

    def load(self, ref: dict[str, Any]) -> Any:
        """The value a ref stands for, refs inside it expanded (a list for a placeholder)."""
        key = values.ref_key(ref)
        if key not in self._read:
            try:
                raw = read_value(self.db, self.tenant_id, *key)
            except StoredValueError:
                if not self.lenient:
                    raise
                missing = {**ref, "missing": True}
                return [missing] if values.is_placeholder(ref) else missing
            self._read[key] = self._walk(raw)
        return self._read[key]

    def _affordable(self, ref: dict[str, Any]) -> bool:
        if self.budget is None:
            return True
        size = values.ref_bytes(ref)
        if size > self.budget:
            return False
        self.budget -= size
        return True

    def expand(self, value: Any) -> Any:
        if values.is_placeholder(value):
            return self.load(value) if self._affordable(value) else self._skip(value)
        return self._walk(value)

    def _skip(self, ref: dict[str, Any]) -> Any:
        return self.on_skip(ref) if self.on_skip is not None else ref

    def _walk(self, value: Any) -> Any:
        if values.is_handle(value):
            return self.load(value) if self._affordable(value) else self._skip(value)
        if isinstance(value, list):
            out: list[Any] = []
            for item in value:
                if values.is_placeholder(item):
                    if self._affordable(item):
                        out.extend(self.load(item))
                    else:
                        out.append(self._skip(item))
                else:
                    out.append(self._walk(item))
            return out
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        return value


def expand(db: Database, tenant_id: str, value: Any) -> Any:
    """`value` with every handle and placeholder in it read back (no-op without any)."""
    if not mentions_refs(value):
        return value
    return Reader(db, tenant_id).expand(value)


def mentions_refs(value: Any) -> bool:
    """Whether `value` may hold a handle or placeholder (cheaper than a walk)."""
    try:
        return values.MARK in json.dumps(value, default=str)
    except (TypeError, ValueError):
        return False


def keep(db: Database, tenant_id: str, workflow_id: str, store: StoreAs | None, value: Any) -> Any:
    """An activity's result as it should go back to its workflow: itself, or, over the
    store's limit, the handle of the record it was written to."""
    if store is None:
        return value
    size = values.size_of(value)
    if size <= store.above:
        return value
    if engine.is_chat_history(value):
        # Compacted like the workflow compacts histories, so chat tasks can go on with it.
        lead, middle, last = values.split_history(value)
        if not all(values.is_placeholder(m) for m in middle):
            write(db, tenant_id, workflow_id, [StoredRecord(VALUE, store.seq, middle)])
            marker = values.placeholder(workflow_id, store.seq, middle)
            return {**value, "messages": [*lead, marker, *last]}
    write(db, tenant_id, workflow_id, [StoredRecord(kind=VALUE, seq=store.seq, data=value)])
    return values.handle(workflow_id, store.seq, size, engine.value_type(value))


def whole_result(
    db: Database,
    tenant_id: str,
    workflow_id: str,
    data: dict[str, Any],
    budget: int | None = None,
    on_skip: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """A chain result, progress or failure details made whole: {"output", "state"} with the
    stored units first and stored values read back. The output is read back in full; the
    units' values within `budget` bytes, past it they stay handles (through `on_skip`)."""
    output = Reader(db, tenant_id, lenient=True).expand(data.get("output"))
    units = read_units(db, tenant_id, workflow_id, int(data.get("stateStored") or 0))
    units += list(data.get("state") or [])
    reader = Reader(db, tenant_id, budget, on_skip, lenient=True)
    return {"output": output, "state": [_unit_view(reader, unit) for unit in units]}


def _unit_view(reader: Reader, unit: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in unit.items():
        shown = reader.expand(value)
        skipped = isinstance(shown, dict) and values.MARK in shown
        if key in ("input", "transition") and values.is_handle(value) and not skipped:
            # These fields are the text of a value; the record holds the value.
            shown = shown if isinstance(shown, str) else engine.as_text(shown)
        out[key] = shown
    return out
