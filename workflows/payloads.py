"""The payload converter chainloom's clients and workers use: Temporal's default JSON, made
cheaper for the dataclasses that cross the workflow/activity boundary.

Measured (docs/benchmarks.md, "Where the LLM-step overhead went"): the SDK's converter calls
`typing.get_type_hints` on every dataclass it decodes (about 0.3 ms each inside the workflow
sandbox) and `dataclasses.asdict` (a deep copy of every chat message) on every one it
encodes, several times per chain step. This one reads a class's field types once and encodes
a dataclass as a shallow mapping; the JSON on the wire is the same, so histories recorded with
the default converter decode the same way, and the other way round.
"""

import dataclasses
import functools
from typing import Any, get_type_hints

from temporalio.converter import (
    AdvancedJSONEncoder,
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
    JSONTypeConverter,
    value_to_type,
)


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type hint, init) of each field of a dataclass, worked out once per class."""
    hints = get_type_hints(cls)
    return tuple((f.name, hints[f.name], f.init) for f in dataclasses.fields(cls))


class CachedDataclasses(JSONTypeConverter):
    """Decodes dataclasses as the SDK does (unknown keys ignored, missing ones left to the
    class's defaults), with the field types cached per class."""

    def to_typed_value(self, hint: type, value: Any) -> Any:
        if not (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
            return JSONTypeConverter.Unhandled
        if not isinstance(value, dict):
            raise TypeError(f"Cannot convert to dataclass {hint}, value is {type(value)} not dict")
        init: dict[str, Any] = {}
        later: dict[str, Any] = {}
        for name, field_hint, in_init in _fields(hint):
            if name not in value:
                continue
            converted = value_to_type(field_hint, value[name], [self])
            (init if in_init else later)[name] = converted
        obj = hint(**init)
        for name, converted in later.items():
            setattr(obj, name, converted)
        return obj


class ShallowEncoder(AdvancedJSONEncoder):
    """A dataclass becomes a mapping of its fields as they are (json walks them next),
    instead of `dataclasses.asdict`'s deep copy."""

    def default(self, o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
        return super().default(o)


class PayloadConverter(CompositePayloadConverter):
    def __init__(self) -> None:
        super().__init__(
            *(
                JSONPlainPayloadConverter(
                    encoder=ShallowEncoder, custom_type_converters=[CachedDataclasses()]
                )
                if isinstance(converter, JSONPlainPayloadConverter)
                else converter
                for converter in DefaultPayloadConverter.default_encoding_payload_converters
            )
        )


def data_converter() -> DataConverter:
    return dataclasses.replace(DataConverter.default, payload_converter_class=PayloadConverter)
