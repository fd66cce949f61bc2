"""The published JSON Schema of chain files, generated from the pydantic model.

``python -m chains.schema`` rewrites ``chains/schema.json``; ``--check`` exits 1 when the file
no longer matches the model (run it in CI so the published schema never drifts).
"""

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from chains.spec import ChainDefinition

__all__ = ["SCHEMA_ID", "SCHEMA_PATH", "chain_json_schema", "render_schema", "write_schema"]

SCHEMA_ID = "https://chainloom.dev/schema/chain.json"
SCHEMA_PATH = Path(__file__).with_name("schema.json")

_STRING = {"type": "string"}
_ANY_SCALAR = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]

# Forms the model accepts through before-validators that pydantic cannot see: contenox
# documents these fields as JSON-encoded strings (or a single branch object), and YAML turns
# `when: 5` into a number. Without this, editors would flag chains that load fine.
_LENIENT: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("ExecuteConfig", "models"): [_STRING],
    ("ExecuteConfig", "providers"): [_STRING],
    ("ExecuteConfig", "hooks"): [_STRING],
    ("ExecuteConfig", "hide_tools"): [_STRING],
    ("HookCall", "args"): [_STRING],
    ("TaskDefinition", "valid_conditions"): [_STRING],
    ("TaskTransition", "branches"): [{"$ref": "#/$defs/TransitionBranch"}],
    ("TransitionBranch", "when"): _ANY_SCALAR[1:],
}


def _widen(prop: dict[str, Any], alternatives: list[dict[str, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        k: prop.pop(k) for k in ("title", "description", "default") if k in prop
    }
    return {**meta, "anyOf": [prop, *copy.deepcopy(alternatives)]}


def chain_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) for chain documents."""
    schema = ChainDefinition.model_json_schema()
    defs = schema.get("$defs", {})
    for (model, field), alternatives in _LENIENT.items():
        target = schema if model == ChainDefinition.__name__ else defs.get(model)
        if target is None or field not in target.get("properties", {}):
            raise RuntimeError(f"schema has no {model}.{field}; update chains/schema.py")
        target["properties"][field] = _widen(target["properties"][field], alternatives)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "chainloom chain",
        "description": (
            "A chainloom task chain (compatible with contenox taskengine chains). "
            "See docs/chains.md."
        ),
    }


def render_schema() -> str:
    """The schema file's exact text: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(chain_json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(render_schema(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chains.schema", description="Regenerate the chain JSON Schema."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--path", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    if args.check:
        try:
            current = args.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = ""
        if current != render_schema():
            print(f"{args.path} is stale; run: python -m chains.schema", file=sys.stderr)
            return 1
        print(f"{args.path} is up to date")
        return 0
    print(f"wrote {write_schema(args.path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
