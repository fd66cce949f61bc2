"""Hooks: the remote hook store and the local hooks (core/hooks/openapi.py turns remote hooks'
OpenAPI documents into tools and calls).

A remote hook is a service with an OpenAPI document; each operation becomes a tool named
"<hook>.<operationId>". The hook's headers (tokens) and injected properties are the hook
owner's business, not the model's: they are removed from the parameters a model sees and added
(overriding anything the model sent) when the call is made. Header values are stored
encrypted and decrypted only inside the API process or an activity, never in workflow history.

Local hooks need no registration: echo, print, webhook and js.

Shared by api/routes/hooks.py and activities/hooks.py; nothing here touches Temporal.
"""

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db import Database
from core.models import FunctionRow, RemoteHookRow
from core.secrets import SecretBox, mask

LOCAL_HOOKS: tuple[str, ...] = ("echo", "print", "webhook", "js")
INJECT_LOCATIONS: tuple[str, ...] = ("query", "path", "header", "body")
# Hooks' answers land in workflow history, whose payloads Temporal caps at a few MB.
MAX_RESPONSE_BYTES = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class HookExists(Exception):
    """A remote hook of that name exists for the tenant."""


class ToolArgumentError(ValueError):
    """The arguments cannot make a request (a path parameter is missing, ...)."""


# --------------------------------------------------------------------------- hook records


@dataclass
class RemoteHook:
    """A remote hook with its header values in clear: lives only inside one process."""

    id: str
    tenant_id: str
    name: str
    endpoint_url: str
    timeout_ms: int
    headers: dict[str, str] = field(repr=False)
    properties: list[dict[str, Any]]
    updated_at: datetime

    @property
    def timeout(self) -> float:
        return max(self.timeout_ms, 1) / 1000.0

    def secret_values(self) -> list[str]:
        """Header values, to scrub from anything that could reach history or a model: each
        whole, and the credential of a "<scheme> <credential>" value on its own (a Basic
        credential decoded too, and its password), as a service may echo just that part."""
        values: list[str] = []
        for value in self.headers.values():
            values.append(value)
            scheme, _, credential = value.partition(" ")
            credential = credential.strip()
            if not (credential and scheme.isalpha()):
                continue
            values.append(credential)
            if scheme.lower() == "basic":
                try:
                    decoded = base64.b64decode(credential, validate=True).decode()
                except ValueError:  # binascii.Error and UnicodeDecodeError alike
                    continue
                values += [decoded, decoded.partition(":")[2]]
        return [v for v in dict.fromkeys(values) if len(v) >= 4]


def valid_hook_name(name: str) -> bool:
    # "." separates hook and tool in tool names, so a hook name never contains one.
    return bool(_NAME_RE.match(name))


def encrypt_headers(box: SecretBox, headers: dict[str, str]) -> str:
    return box.encrypt(json.dumps(headers, sort_keys=True)) if headers else ""


def decrypt_headers(box: SecretBox, token: str) -> dict[str, str]:
    if not token:
        return {}
    data = json.loads(box.decrypt(token))
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def masked_headers(box: SecretBox, row: RemoteHookRow) -> dict[str, str]:
    """What the API shows of a hook's headers: the names, values masked."""
    try:
        clear = decrypt_headers(box, row.headers_encrypted)
    except ValueError:
        return {"": "****"} if row.headers_encrypted else {}
    return {name: mask(value) for name, value in clear.items()}


def to_remote_hook(box: SecretBox, row: RemoteHookRow) -> RemoteHook:
    return RemoteHook(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        endpoint_url=row.endpoint_url,
        timeout_ms=row.timeout_ms,
        headers=decrypt_headers(box, row.headers_encrypted),
        properties=list(row.properties or []),
        updated_at=row.updated_at,
    )


def list_hooks(
    db: Database,
    tenant_id: str,
    *,
    after: datetime | None = None,
    limit: int = 100,
    name: str | None = None,
) -> list[RemoteHookRow]:
    query = select(RemoteHookRow).where(RemoteHookRow.tenant_id == tenant_id)
    if name:
        query = query.where(RemoteHookRow.name == name)
    if after is not None:
        query = query.where(col(RemoteHookRow.created_at) > after)
    query = query.order_by(col(RemoteHookRow.created_at), col(RemoteHookRow.id)).limit(limit)
    with db.session() as session:
        return list(session.exec(query).all())


def hook_names(db: Database, tenant_id: str) -> list[str]:
    query = select(RemoteHookRow.name).where(RemoteHookRow.tenant_id == tenant_id)
    with db.session() as session:
        return sorted(session.exec(query).all())


def get_hook(db: Database, tenant_id: str, hook_id: str) -> RemoteHookRow | None:
    with db.session() as session:
        row = session.get(RemoteHookRow, hook_id)
    return row if row is not None and row.tenant_id == tenant_id else None


def get_hook_by_name(db: Database, tenant_id: str, name: str) -> RemoteHookRow | None:
    query = select(RemoteHookRow).where(
        RemoteHookRow.tenant_id == tenant_id, RemoteHookRow.name == name
    )
    with db.session() as session:
        return session.exec(query).first()


def save_hook(db: Database, row: RemoteHookRow) -> RemoteHookRow:
    """Insert or update; raises HookExists when the name is taken by another hook."""
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            session.rollback()
            raise HookExists(row.name) from err
    return row


def delete_hook(db: Database, tenant_id: str, hook_id: str) -> bool:
    with db.session() as session:
        row = session.get(RemoteHookRow, hook_id)
        if row is None or row.tenant_id != tenant_id:
            return False
        session.delete(row)
        session.commit()
        return True


def load_remote_hook(db: Database, box: SecretBox, tenant_id: str, name: str) -> RemoteHook | None:
    row = get_hook_by_name(db, tenant_id, name)
    return to_remote_hook(box, row) if row is not None else None


def function_tools(db: Database, tenant_id: str) -> list[tuple[str, str]]:
    """(name, description) of the tenant's stored JS functions, offered as "js.<name>"."""
    query = select(FunctionRow.name, FunctionRow.description).where(
        FunctionRow.tenant_id == tenant_id
    )
    with db.session() as session:
        return [(n, d) for n, d in session.exec(query).all()]


# --------------------------------------------------------------------------- local hooks

ANY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}

LOCAL_TOOLS: dict[str, tuple[str, dict[str, Any]]] = {
    "echo": ("Returns its arguments unchanged.", ANY_OBJECT),
    "print": (
        "Writes a message to the run's log and returns it.",
        {
            "type": "object",
            "properties": {"message": {"type": "string", "description": "Text to print."}},
            "required": ["message"],
        },
    ),
    "webhook": (
        "POSTs a JSON payload to a URL and returns the answer.",
        {
            "type": "object",
            "properties": {
                "url": {"type": "string", "description": "The http(s) URL to POST to."},
                "payload": {"type": "object", "description": "The JSON body to send."},
            },
            "required": ["url"],
        },
    ),
}


def local_openapi(name: str) -> dict[str, Any]:
    """A small OpenAPI document describing a local hook, for /hooks/schemas."""
    if name == "js":
        description = "Runs the stored JS function named by the tool (js.<function>)."
        parameters = ANY_OBJECT
    else:
        description, parameters = LOCAL_TOOLS[name]
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{name} (local hook)", "version": "1"},
        "paths": {
            f"/{name}": {
                "post": {
                    "operationId": name,
                    "description": description,
                    "requestBody": {
                        "content": {"application/json": {"schema": parameters}},
                    },
                    "responses": {"200": {"description": "The hook's output."}},
                }
            }
        },
    }
