"""Permission levels, roles and API-key scopes, and how they combine (docs/identity.md).

Every route belongs to a resource type and needs a level: reading needs `view`, changing
needs `edit`, and identity and audit routes need `manage`. A user's level comes from their
role in the tenant; an API key's from its scopes. Access entries then override the level of
one identity, for one resource type, on one resource id or on all of them ("*").
"""

from collections.abc import Iterable

LEVELS = ("none", "view", "edit", "manage")
RANK = {name: i for i, name in enumerate(LEVELS)}
ROLES = {"viewer": "view", "member": "edit", "admin": "manage"}
# Scopes an API key may carry: these three for every resource type, or "<type>:<scope>".
SCOPE_LEVELS = {"read": "view", "write": "edit", "admin": "manage"}

# Resource types, each with the first path segments of the routes that act on it.
RESOURCE_TYPES: dict[str, tuple[str, ...]] = {
    "taskchains": ("taskchains",),
    "runs": ("tasks", "runs"),
    "backends": ("backends", "state"),
    "models": ("models", "defaultmodel", "queue"),
    "groups": (
        "groups",
        "group-by-name",
        "group-by-purpose",
        "backend-affinity",
        "model-affinity",
    ),
    "providers": ("providers",),
    "events": ("events", "ingest", "raw-events", "mapping", "mappings", "replay", "sync"),
    "triggers": ("event-triggers",),
    "hooks": ("hooks", "supported"),
    "functions": ("functions",),
    "users": ("users",),
    "access": ("access-control",),
    "apikeys": ("api-keys",),
    "tenants": ("tenants",),
    "activity": ("activity", "audit"),
    "usage": ("usage",),
}
# Routes about the caller themself (their profile, session, projects): any signed-in identity.
SELF = "self"
# Routes about the whole installation: system administrators only.
SYSTEM = "system"
SELF_SEGMENTS = ("me", "ui", "projects", "permissions")
# Only managers may read these, not just change them.
MANAGE_TO_READ = frozenset({"users", "access", "apikeys", "activity"})

SEGMENT_TYPES = {seg: kind for kind, segs in RESOURCE_TYPES.items() for seg in segs}

# Routes whose POST starts a run: logged as "execute", and refused once the token quota is
# used up (cancelling or approving a run already going stays allowed).
STARTS_RUNS = frozenset({"/tasks", "/runs"})
SEGMENT_TYPES.update({seg: SELF for seg in SELF_SEGMENTS})
SEGMENT_TYPES["system"] = SYSTEM


def valid_scope(scope: str) -> bool:
    kind, sep, level = scope.rpartition(":")
    if not sep:
        return scope in SCOPE_LEVELS
    return kind in RESOURCE_TYPES and level in SCOPE_LEVELS


def scope_level(scopes: Iterable[str], resource_type: str) -> str:
    best = "none"
    for scope in scopes:
        kind, sep, name = scope.rpartition(":")
        if sep and kind != resource_type:
            continue
        level = SCOPE_LEVELS.get(name, "none")
        if RANK[level] > RANK[best]:
            best = level
    return best


def required_level(resource_type: str, method: str) -> str:
    if resource_type in (SELF, SYSTEM):
        return "none"  # SYSTEM is checked against the system-admin flag instead
    if resource_type in MANAGE_TO_READ:
        return "manage"
    return "view" if method in ("GET", "HEAD", "OPTIONS") else "edit"


def at_least(level: str, needed: str) -> bool:
    return RANK.get(level, 0) >= RANK[needed]
