"""Backend lookup shared by the API (status), the state sync and the LLM activities (routing).

Hosted providers need their API key for every call, model listings included, so refs are
built with the tenant's provider keys; the keys are read here, never passed through workflows.

Which backend receives a key is decided here and nowhere else: a backend of the key's type
gets it when its baseUrl is the URL the key is bound to, or when an admin approved the
backend at its current type and baseUrl (an admin created or last re-pointed it). Any other
backend is called without a key, so a key only goes where an administrator sent it.
"""

from collections.abc import Mapping

from sqlmodel import col, select

from core.backends.keys import KEYED_TYPES, ProviderKey, provider_keys, same_endpoint
from core.backends.providers import BackendRef
from core.db import Database
from core.models import BackendRow
from core.secrets import SecretBox

BOUND = "bound"
APPROVED = "approved"


def approval_target(kind: str, base_url: str) -> str:
    """What an admin approves: the backend's type and baseUrl (BackendRow.approved_for)."""
    return f"{kind} {base_url}"


def key_grant(row: BackendRow, bound_url: str | None) -> str:
    """Why the backend receives its type's provider key ("bound" or "approved"), or "" when it
    does not. `bound_url` is the key's bound URL, None when no key is stored."""
    if bound_url is None or row.type not in KEYED_TYPES:
        return ""
    if bound_url and same_endpoint(row.base_url, bound_url):
        return BOUND
    if row.approved_by and row.approved_for == approval_target(row.type, row.base_url):
        return APPROVED
    return ""


def key_at_stake(kind: str, base_url: str, bindings: Mapping[str, str]) -> bool:
    """Whether a backend of `kind` at `base_url` would be sent a stored key it is not bound
    to, were it approved: creating or re-pointing it then needs manage on backends."""
    if kind not in KEYED_TYPES or kind not in bindings:
        return False
    bound = bindings[kind]
    return not (bound and same_endpoint(base_url, bound))


def backend_refs(db: Database, tenant_id: str, box: SecretBox | None = None) -> list[BackendRef]:
    with db.session() as session:
        rows = session.exec(
            select(BackendRow)
            .where(BackendRow.tenant_id == tenant_id)
            .order_by(col(BackendRow.created_at), col(BackendRow.id))
        ).all()
    keys = provider_keys(db, box, tenant_id) if box is not None else {}
    return [to_ref(row, keys) for row in rows]


def to_ref(row: BackendRow, keys: Mapping[str, ProviderKey] | None = None) -> BackendRef:
    """`keys` maps provider type to its key (core.backends.keys.provider_keys); the backend
    gets its type's key only when key_grant says so."""
    key = (keys or {}).get(row.type)
    granted = key is not None and bool(key_grant(row, key.base_url))
    return BackendRef(
        id=row.id,
        name=row.name,
        type=row.type,
        base_url=row.base_url,
        api_key=key.api_key if key is not None and granted else "",
    )
