"""Chain validation for the API: the linter's problems become a 422 naming each pointer."""

from typing import Any

from api.errors import APIError
from chains.loader import ChainError, load_chain
from chains.spec import ChainDefinition


def validate_chain(data: Any) -> ChainDefinition:
    if not isinstance(data, dict):
        raise APIError(422, "invalid_chain", "a task chain must be a JSON object")
    try:
        return load_chain(data)
    except ChainError as err:
        problems = [p for p in err.problems if getattr(p, "severity", "error") == "error"]
        problems = problems or list(err.problems)
        errors = [
            {"field": p.pointer, "message": p.message, "code": "invalid_chain"} for p in problems
        ]
        summary = "; ".join(f"{p.pointer}: {p.message}" for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise APIError(
            422,
            "invalid_chain",
            f"invalid task chain: {summary}{more}",
            param=problems[0].pointer if problems else None,
            errors=errors,
        ) from err
