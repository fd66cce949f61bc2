"""Checks of /openapi.json against itself and against the bodies the API sends.

`untyped` says whether a schema tells a client nothing about a body's shape; `conforms`
asserts that a body validates against its declared schema and carries no key the schema
does not name (pydantic's schemas allow unknown keys unless a model says otherwise, so plain
JSON Schema validation alone would let an undocumented key through).
"""

from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

Schema = dict[str, Any]
SCHEMAS = "#/components/schemas/"


def resolve(doc: Schema, schema: Schema) -> Schema:
    """The component `schema` points at (a dangling reference raises), or `schema`."""
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith(SCHEMAS), ref
    found: Schema = doc["components"]["schemas"][ref.removeprefix(SCHEMAS)]
    return found


def untyped(doc: Schema, schema: Schema | None) -> bool:
    """An object with no properties (any keys, any values), an array of such, or nothing.

    A map whose values are objects of a known shape counts as typed; a union is untyped when
    any of its members (null aside) is.
    """
    if not schema:
        return True
    schema = resolve(doc, schema)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            members = [m for m in schema[key] if m.get("type") != "null"]
            return not members or any(untyped(doc, m) for m in members)
    kind = schema.get("type")
    if kind == "array":
        return untyped(doc, schema.get("items"))
    if kind not in (None, "object"):
        return False  # string, integer, number, boolean
    if schema.get("properties"):
        return False
    values = schema.get("additionalProperties")
    if isinstance(values, dict) and values and values.get("type") in (None, "object"):
        return untyped(doc, values)  # a map: typed when its values are
    return True


def conforms(doc: Schema, schema: Schema, body: Any) -> None:
    """`body` is valid against `schema` and holds no undocumented key, at any depth."""
    validator = Draft202012Validator(
        {**schema, "components": doc["components"]}, format_checker=FormatChecker()
    )
    problems = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not problems, [f"{list(p.absolute_path)}: {p.message}" for p in problems[:5]]
    _documented(doc, schema, body, "$")


def _matches(doc: Schema, schema: Schema, body: Any) -> bool:
    validator = Draft202012Validator({**schema, "components": doc["components"]})
    return validator.is_valid(body)


def _documented(doc: Schema, schema: Schema, body: Any, where: str) -> None:
    schema = resolve(doc, schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            # The member a body matches is the one that says which keys it may have.
            members = [m for m in schema[key] if _matches(doc, m, body)]
            assert members, f"{where}: matches no member of {key}"
            _documented(doc, members[0], body, where)
            return
    for member in schema.get("allOf", []):
        _documented(doc, member, body, where)
    if isinstance(body, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(body):
            _documented(doc, schema["items"], item, f"{where}[{index}]")
    if not isinstance(body, dict):
        return
    properties: Schema = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    if properties and extra is None:
        undocumented = set(body) - set(properties)
        assert not undocumented, f"{where}: keys not in {schema.get('title')}: {undocumented}"
    for name, value in body.items():
        if name in properties:
            _documented(doc, properties[name], value, f"{where}.{name}")
        elif isinstance(extra, dict):
            _documented(doc, extra, value, f"{where}.{name}")


def response_schema(doc: Schema, path: str, method: str, status: int) -> Schema:
    response = doc["paths"][path][method]["responses"][str(status)]
    schema: Schema = response["content"]["application/json"]["schema"]
    return schema
