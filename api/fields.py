"""Checks shared by the request bodies' pydantic models."""

from typing import TypeVar

_Text = TypeVar("_Text", bound=str | None)


def plain_text(value: _Text) -> _Text:
    """PostgreSQL text cannot hold NUL: such a field is refused as a 422 naming it, the same
    on both databases (SQLite would have stored it)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def a_name(value: str) -> str:
    """A name as given, trimmed; blank names are refused."""
    if not value.strip():
        raise ValueError("name must not be blank")
    return plain_text(value.strip())
