"""OpenAPI documents turned into tools, and tool calls turned into HTTP requests.

Parameters the hook owner injects and headers it sets are hidden from the tool a model sees
and added (overriding anything the model sent) when the call is built.
"""

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import yaml

from core import outbound
from core.hooks.store import (
    RemoteHook,
    ToolArgumentError,
)

SCHEMA_MAX_BYTES = 5 * 1024 * 1024
# Headers chainloom sets itself; a model never gets to choose them.
_RESERVED_HEADERS = frozenset({"idempotency-key", "host", "content-length", "content-type"})
_PATH_PARAM_RE = re.compile(r"\{([^}/]+)\}")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

# --------------------------------------------------------------------------- OpenAPI → tools


@dataclass
class Param:
    name: str
    location: str  # query | path | header
    required: bool
    schema: dict[str, Any]


@dataclass
class Operation:
    """One OpenAPI operation as a tool: how to call it and what the model may fill in."""

    name: str
    method: str
    path: str
    description: str
    params: list[Param]
    body_schema: dict[str, Any] | None = None
    # True: the body's properties are top-level arguments; False: they sit under "body".
    body_flat: bool = False
    body_required: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def _deref(doc: dict[str, Any], node: Any) -> Any:
    """One level of a local "#/..." $ref."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 20:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            return {}
        target: Any = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
            if target is None:
                return {}
        node = target
        seen += 1
    return node


def inline_schema(doc: dict[str, Any], schema: Any, stack: tuple[str, ...] = ()) -> Any:
    """The schema with every local $ref inlined (a recursive one becomes a plain object),
    so the model gets a self-contained parameters schema."""
    if isinstance(schema, list):
        return [inline_schema(doc, item, stack) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str):
        if ref in stack or len(stack) > 16:
            return {"type": "object"}
        resolved = _deref(doc, schema)
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        merged = {**resolved, **extra} if isinstance(resolved, dict) else resolved
        return inline_schema(doc, merged, (*stack, ref))
    return {key: inline_schema(doc, value, stack) for key, value in schema.items()}


def _tool_name(operation_id: str, method: str, path: str) -> str:
    raw = operation_id or f"{method}_{path}"
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", raw).strip("_")
    return name or method


def _json_body_schema(doc: dict[str, Any], op: dict[str, Any]) -> tuple[Any, bool]:
    body = _deref(doc, op.get("requestBody"))
    if not isinstance(body, dict):
        return None, False
    content = body.get("content") or {}
    for media, spec in content.items():
        if "json" in str(media) and isinstance(spec, dict):
            return inline_schema(doc, spec.get("schema") or {}), bool(body.get("required"))
    return None, False


def _collect_params(doc: dict[str, Any], item: dict[str, Any], op: dict[str, Any]) -> list[Param]:
    merged: dict[tuple[str, str], Param] = {}
    for raw in [*(item.get("parameters") or []), *(op.get("parameters") or [])]:
        p = _deref(doc, raw)
        if not isinstance(p, dict) or p.get("in") not in ("query", "path", "header"):
            continue
        schema = inline_schema(doc, p.get("schema") or {"type": "string"})
        if p.get("description") and isinstance(schema, dict) and "description" not in schema:
            schema = {**schema, "description": p["description"]}
        param = Param(str(p["name"]), str(p["in"]), bool(p.get("required")), schema)
        merged[(param.location, param.name)] = param
    return list(merged.values())


@dataclass(frozen=True)
class Hidden:
    """What a hook supplies itself, and so what its tools must not ask the model for."""

    properties: frozenset[tuple[str, str]] = frozenset()  # (in, name); header names lower-case
    header_names: frozenset[str] = frozenset()  # lower-case

    @classmethod
    def of(cls, hook: RemoteHook | None) -> "Hidden":
        if hook is None:
            return cls()
        props = set()
        for prop in hook.properties:
            where, name = str(prop.get("in", "")), str(prop.get("name", ""))
            props.add((where, name.lower() if where == "header" else name))
        headers = {h.lower() for h in hook.headers} | _RESERVED_HEADERS
        return cls(frozenset(props), frozenset(headers))

    def hides(self, param: Param) -> bool:
        if param.location == "header":
            lower = param.name.lower()
            return lower in self.header_names or ("header", lower) in self.properties
        return (param.location, param.name) in self.properties

    def hides_body_field(self, name: str) -> bool:
        return ("body", name) in self.properties


def operations(doc: dict[str, Any], hidden: Hidden | None = None) -> list[Operation]:
    """Every operation of an OpenAPI document, with the parameters a model may fill in."""
    hidden = hidden or Hidden()
    found: list[Operation] = []
    used: set[str] = set()
    paths = doc.get("paths") if isinstance(doc, dict) else None
    for path, raw_item in (paths or {}).items():
        item = _deref(doc, raw_item)
        if not isinstance(item, dict):
            continue
        for method in _HTTP_METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            name = _tool_name(str(op.get("operationId") or ""), method, str(path))
            base, n = name, 2
            while name in used:
                name, n = f"{base}_{n}", n + 1
            used.add(name)
            params = _collect_params(doc, item, op)
            body, body_required = _json_body_schema(doc, op)
            operation = Operation(
                name=name,
                method=method.upper(),
                path=str(path),
                description=_describe(op, method, str(path)),
                params=params,
                body_schema=body if isinstance(body, dict) else None,
                body_required=body_required,
            )
            operation.parameters = _visible_parameters(operation, hidden)
            found.append(operation)
    return found


def _describe(op: dict[str, Any], method: str, path: str) -> str:
    parts = [str(op[k]).strip() for k in ("summary", "description") if op.get(k)]
    text = "\n\n".join(dict.fromkeys(p for p in parts if p))
    return text or f"{method.upper()} {path}"


def _visible_parameters(op: Operation, hidden: Hidden) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in op.params:
        if hidden.hides(param):
            continue
        properties[param.name] = param.schema
        if param.required or param.location == "path":
            required.append(param.name)
    body = op.body_schema
    if body is not None:
        fields = body.get("properties") if isinstance(body.get("properties"), dict) else None
        is_object = body.get("type") == "object" or fields is not None
        if is_object and fields is not None and not set(fields) & set(properties):
            op.body_flat = True
            for key, field_schema in fields.items():
                if hidden.hides_body_field(key):
                    continue
                properties[key] = field_schema
                if key in (body.get("required") or []):
                    required.append(key)
        else:
            shown = body
            if fields is not None:
                kept = {k: v for k, v in fields.items() if not hidden.hides_body_field(k)}
                shown = {**body, "properties": kept}
                if body.get("required"):
                    shown["required"] = [r for r in body["required"] if r in kept]
            properties["body"] = shown
            if op.body_required:
                required.append("body")
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(dict.fromkeys(required))
    return schema


# --------------------------------------------------------------------------- calls


@dataclass
class PreparedCall:
    method: str
    url: str
    params: list[tuple[str, str]]
    headers: dict[str, str] = field(repr=False)
    json_body: Any = None
    has_body: bool = False


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _query_values(name: str, value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, list):
        return [(name, _text(v)) for v in value if v is not None]
    return [(name, _text(value))]


def build_call(
    hook: RemoteHook, base_url: str, op: Operation, args: dict[str, Any], idempotency_key: str
) -> PreparedCall:
    """The HTTP request for one tool call: the model's arguments split into path, query,
    header and body as the operation declares them, then the hook's injected properties and
    headers on top (they win over anything the model sent)."""
    hidden = Hidden.of(hook)
    injected: dict[tuple[str, str], Any] = {}
    for prop in hook.properties:
        injected[(str(prop.get("in", "")), str(prop.get("name", "")))] = prop.get("value")

    def path_value(match: re.Match[str]) -> str:
        name = match.group(1)
        if ("path", name) in injected:
            value = injected[("path", name)]
        elif name in args and args[name] is not None:
            value = args[name]
        else:
            raise ToolArgumentError(f"tool {hook.name}.{op.name} needs the argument {name!r}")
        return quote(_text(value), safe="")

    path = _PATH_PARAM_RE.sub(path_value, op.path)
    declared = {p.name for p in op.params}
    query: list[tuple[str, str]] = []
    headers: dict[str, str] = {}
    for param in op.params:
        if hidden.hides(param) or param.name not in args:
            continue
        if param.location == "query" and ("query", param.name) not in injected:
            query.extend(_query_values(param.name, args[param.name]))
        elif param.location == "header" and args[param.name] is not None:
            headers[param.name] = _text(args[param.name])
    for (where, name), value in injected.items():
        if where == "query":
            query.extend(_query_values(name, value))
        elif where == "header" and value is not None:
            headers[name] = _text(value)
    headers.update(hook.headers)
    headers["Idempotency-Key"] = idempotency_key

    body: Any = None
    has_body = False
    if op.body_schema is not None:
        has_body = True
        if op.body_flat:
            body = {k: v for k, v in args.items() if k not in declared}
        else:
            body = args.get("body")
    body_props = {name: value for (where, name), value in injected.items() if where == "body"}
    if body_props and (has_body or op.method in ("POST", "PUT", "PATCH")):
        if body is None:
            body = {}
        if isinstance(body, dict):
            body = {**body, **body_props}
        has_body = True
    url = base_url.rstrip("/") + (path if path.startswith("/") else "/" + path)
    return PreparedCall(op.method, url, query, headers, body, has_body)


# --------------------------------------------------------------------------- schemas


def schema_url(endpoint_url: str) -> str:
    """Where a hook's OpenAPI document lives: the endpoint itself when it names a document,
    else <endpoint>/openapi.json (what FastAPI and most frameworks serve)."""
    path = urlsplit(endpoint_url).path.lower()
    if path.endswith((".json", ".yaml", ".yml")):
        return endpoint_url
    return endpoint_url.rstrip("/") + "/openapi.json"


def base_url(endpoint_url: str, doc: dict[str, Any]) -> str:
    """Where operations are called. A `servers` entry is honoured only when it stays on the
    endpoint's origin: the hook's secret headers must not follow a document elsewhere."""
    doc_url = schema_url(endpoint_url)
    default = endpoint_url if doc_url != endpoint_url else urljoin(doc_url, ".")
    servers = doc.get("servers") if isinstance(doc, dict) else None
    if isinstance(servers, list) and servers and isinstance(servers[0], dict):
        server = str(servers[0].get("url") or "")
        if server and "{" not in server:
            resolved = urljoin(doc_url, server)
            a, b = urlsplit(resolved), urlsplit(endpoint_url)
            if (a.scheme, a.netloc) == (b.scheme, b.netloc):
                return resolved.rstrip("/")
    return default.rstrip("/")


def parse_document(body: bytes, content_type: str, url: str) -> dict[str, Any]:
    text = body.decode("utf-8", errors="replace")
    if "yaml" in content_type or url.lower().endswith((".yaml", ".yml")):
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("paths", {}), dict):
        raise ValueError("not an OpenAPI document (no `paths` object)")
    return data


class SchemaError(Exception):
    """The hook's OpenAPI document could not be fetched or read."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status


async def fetch_document(hook: RemoteHook, allowlist: str) -> dict[str, Any]:
    """The hook's OpenAPI document, fetched through the outbound policy with its headers
    (services often protect their document like their operations)."""
    url = schema_url(hook.endpoint_url)
    try:
        resp = await outbound.fetch(
            "GET",
            url,
            headers={"Accept": "application/json, application/yaml", **hook.headers},
            timeout=hook.timeout,
            max_bytes=SCHEMA_MAX_BYTES,
            allowlist=allowlist,
        )
    except outbound.OutboundRefused as err:
        raise SchemaError(f"hook {hook.name}: {err}", transient=False) from err
    except outbound.OutboundError as err:
        raise SchemaError(f"hook {hook.name}: {err}", transient=err.transient) from err
    if resp.status >= 400:
        transient = resp.status >= 500 or resp.status in (408, 429)
        raise SchemaError(
            f"hook {hook.name}: GET {url} answered HTTP {resp.status}",
            transient=transient,
            status=resp.status,
        )
    try:
        return parse_document(resp.body, resp.headers.get("content-type", ""), url)
    except (ValueError, yaml.YAMLError) as err:
        raise SchemaError(
            f"hook {hook.name}: {url} is not a readable OpenAPI document: {err}", transient=False
        ) from err


class SchemaCache:
    """OpenAPI documents by hook, kept `ttl` seconds. A hook edited since (new URL, new
    headers) misses the cache, as its update time is part of the key."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._docs: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    @staticmethod
    def _key(hook: RemoteHook) -> tuple[str, str, str]:
        return (hook.id, hook.endpoint_url, hook.updated_at.isoformat())

    def cached(self, hook: RemoteHook) -> dict[str, Any] | None:
        entry = self._docs.get(self._key(hook))
        if entry is None or time.monotonic() - entry[0] >= self.ttl:
            return None
        return entry[1]

    async def get(
        self, hook: RemoteHook, allowlist: str, *, refresh: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """(document, fetched now)."""
        if not refresh:
            doc = self.cached(hook)
            if doc is not None:
                return doc, False
        doc = await fetch_document(hook, allowlist)
        # Entries of the hook's older versions are dropped with the new one.
        for key in [k for k in self._docs if k[0] == hook.id]:
            del self._docs[key]
        self._docs[self._key(hook)] = (time.monotonic(), doc)
        return doc, True
