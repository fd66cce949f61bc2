"""Settings from the environment (pydantic-settings); one object shared by api/ and activities/."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    data_dir: Path = Field(Path(".chainloom"), alias="CHAINLOOM_DATA_DIR")
    database_url: str = Field("", alias="DATABASE_URL")
    temporal_address: str = Field("localhost:7233", alias="TEMPORAL_ADDRESS")
    temporal_namespace: str = Field("default", alias="TEMPORAL_NAMESPACE")
    temporal_tls: bool = Field(False, alias="TEMPORAL_TLS")
    temporal_api_key: str = Field("", alias="TEMPORAL_API_KEY")
    task_queue: str = Field("chainloom", alias="CHAINLOOM_TASK_QUEUE")
    api_key: str = Field("", alias="CHAINLOOM_API_KEY")
    default_tenant: str = Field("default", alias="CHAINLOOM_DEFAULT_TENANT")
    # Used by tasks whose execute_config names no model.
    default_model: str = Field("", alias="CHAINLOOM_DEFAULT_MODEL")

    # Fernet key(s) for provider API keys at rest; generated into the data dir when unset.
    secret_key: str = Field("", alias="CHAINLOOM_SECRET_KEY")
    # With groups enabled, only backends and models sharing an affinity group are routed to.
    groups_enabled: bool = Field(False, alias="CHAINLOOM_GROUPS_ENABLED")
    # A backend that fails transiently is skipped by routing for this long.
    backend_down_seconds: float = Field(30.0, alias="CHAINLOOM_BACKEND_DOWN_SECONDS")
    # How often the state-sync schedule refreshes every backend's health and models.
    sync_interval: float = Field(60.0, alias="CHAINLOOM_SYNC_INTERVAL")
    # State sync deletes models it did not pull only when this is on.
    sync_delete_undeclared: bool = Field(False, alias="CHAINLOOM_SYNC_DELETE_UNDECLARED")

    # How long POST /tasks waits for a run before answering 202 with the run id.
    tasks_wait_timeout: float = Field(600.0, alias="CHAINLOOM_TASKS_WAIT_TIMEOUT")
    # Transient LLM failures (lost worker, network, 408/409/429/5xx) are retried by Temporal
    # up to this many attempts; they do not count against a task's retry_on_failure.
    llm_max_attempts: int = Field(5, alias="CHAINLOOM_LLM_MAX_ATTEMPTS")
    llm_timeout: float = Field(300.0, alias="CHAINLOOM_LLM_TIMEOUT")
    # Recovery from a lost worker (docs/operations.md, "Recovery after a worker crash"). A
    # worker that dies mid-call is noticed this long after its last heartbeat (activities beat
    # every third of it), and the call moves to another worker: for model calls, and for hook
    # and JS calls.
    llm_heartbeat_timeout: float = Field(3.0, alias="CHAINLOOM_LLM_HEARTBEAT_TIMEOUT")
    tool_heartbeat_timeout: float = Field(3.0, alias="CHAINLOOM_TOOL_HEARTBEAT_TIMEOUT")
    # First wait before Temporal retries a failed or timed-out model, hook or JS call (it
    # doubles per attempt, up to 30 s).
    retry_initial_interval: float = Field(1.0, alias="CHAINLOOM_RETRY_INITIAL_INTERVAL")
    # A chain run's workflow task lost with its worker is handed out again after this long.
    workflow_task_timeout: float = Field(5.0, alias="CHAINLOOM_WORKFLOW_TASK_TIMEOUT")
    # A workflow task waits this long for the worker that has the run cached (its sticky
    # queue) before any worker may take it.
    sticky_timeout: float = Field(2.0, alias="CHAINLOOM_STICKY_TIMEOUT")
    # On SIGTERM/SIGINT a worker takes no new tasks and gives running activities this long to
    # finish (they keep heartbeating); what is still running then is retried elsewhere.
    shutdown_grace: float = Field(30.0, alias="CHAINLOOM_WORKER_SHUTDOWN_GRACE")
    # Chain limits (docs/chains.md, "Limits"): the bytes a template may render (and the size
    # of any value it builds), the operations one render may do (loop iterations, calls, text
    # handled), the bytes of a task's output, and of a run's whole result, which must stay
    # under the Temporal server's payload limit (limit.blobSize.error, 2 MiB by default).
    template_max_output_bytes: int = Field(
        512 * 1024, ge=1, alias="CHAINLOOM_TEMPLATE_MAX_OUTPUT_BYTES"
    )
    template_max_operations: int = Field(100_000, ge=1, alias="CHAINLOOM_TEMPLATE_MAX_OPERATIONS")
    task_output_max_bytes: int = Field(512 * 1024, ge=1, alias="CHAINLOOM_TASK_OUTPUT_MAX_BYTES")
    run_result_max_bytes: int = Field(2_000_000, ge=1, alias="CHAINLOOM_RUN_RESULT_MAX_BYTES")
    # Long and large chains (docs/chains.md): a chain run continues as new after this many
    # steps (sooner when its history grows large); task outputs and state fields over the
    # value limit (bytes of JSON) are kept in the database, not in Temporal history; a js task
    # may return up to the output maximum that way; GET /runs/{id} and POST /tasks read stored
    # values back inline up to the view maximum, past it they link GET /runs/{id}/values/{seq}.
    chain_steps_per_run: int = Field(1000, ge=1, alias="CHAINLOOM_CHAIN_STEPS_PER_RUN")
    chain_value_limit: int = Field(
        64 * 1024, ge=1024, le=128 * 1024, alias="CHAINLOOM_CHAIN_VALUE_LIMIT"
    )
    chain_output_max_bytes: int = Field(
        16 << 20, ge=1 << 20, alias="CHAINLOOM_CHAIN_OUTPUT_MAX_BYTES"
    )
    run_view_max_bytes: int = Field(16 << 20, ge=0, alias="CHAINLOOM_RUN_VIEW_MAX_BYTES")
    # Routing caches the backend, health and group tables this long inside a worker; a model
    # it cannot place makes it look again at once, so additions are never missed.
    routing_cache_seconds: float = Field(5.0, alias="CHAINLOOM_ROUTING_CACHE_SECONDS")
    # Backend model lists are cached this long inside a worker.
    backend_models_ttl: float = Field(30.0, alias="CHAINLOOM_BACKEND_MODELS_TTL")

    # Outbound HTTP to user-supplied URLs refuses loopback/private/link-local/metadata
    # addresses except these (comma-separated hosts, IPs or CIDRs; see core/outbound.py).
    outbound_allowlist: str = Field("", alias="CHAINLOOM_OUTBOUND_ALLOWLIST")
    # The same policy for model servers (backends' baseUrl), with a list of its own, as
    # they usually live on a private network; `chainloom dev` allows loopback.
    backend_allowlist: str = Field("", alias="CHAINLOOM_BACKEND_ALLOWLIST")
    # Remote hooks' OpenAPI documents are cached this long (seconds) by workers and the API.
    hook_schema_ttl: float = Field(300.0, alias="CHAINLOOM_HOOK_SCHEMA_TTL")

    # Events: a trigger chain deeper than this (a function whose sendEvent fires its own
    # trigger, directly or in a cycle) is stopped with a chainloom.trigger.depth_exceeded event.
    trigger_max_depth: int = Field(8, alias="CHAINLOOM_TRIGGER_MAX_DEPTH")
    # How often each API process and worker looks for trigger starts that failed or were left
    # by a process that died (the trigger outbox); 0 turns its sweeper off.
    trigger_sweep_interval: float = Field(1.0, alias="CHAINLOOM_TRIGGER_SWEEP_INTERVAL")
    # How often /events/stream polls the database; API and workers are separate processes.
    event_poll_interval: float = Field(0.25, alias="CHAINLOOM_EVENT_POLL_INTERVAL")

    # JS functions (docs/functions.md): seconds of JavaScript per call (time spent waiting on
    # builtins not counted), V8 memory per call, the whole call's wall time with builtins and
    # its wait for a turn, and the host processes per worker (and per API process): kept
    # warm, and at most.
    js_timeout: float = Field(5.0, alias="CHAINLOOM_JS_TIMEOUT")
    js_memory_mb: int = Field(128, alias="CHAINLOOM_JS_MEMORY_MB")
    js_wall_timeout: float = Field(60.0, alias="CHAINLOOM_JS_WALL_TIMEOUT")
    js_pool_size: int = Field(2, alias="CHAINLOOM_JS_POOL_SIZE")
    js_pool_max: int = Field(8, alias="CHAINLOOM_JS_POOL_MAX")
    # Fairness: one tenant's calls running JavaScript at once per process, and how many more
    # may wait for a turn; a host above the warm minimum goes after this long unneeded.
    js_tenant_concurrency: int = Field(2, alias="CHAINLOOM_JS_TENANT_CONCURRENCY")
    js_tenant_queue: int = Field(20, alias="CHAINLOOM_JS_TENANT_QUEUE")
    js_pool_idle: float = Field(30.0, alias="CHAINLOOM_JS_POOL_IDLE")

    # Identity (docs/identity.md). JWTs are signed with this, else with a key derived from
    # CHAINLOOM_SECRET_KEY (or the generated one), so API processes agree without setup.
    jwt_secret: str = Field("", alias="CHAINLOOM_JWT_SECRET")
    access_token_ttl: float = Field(900.0, alias="CHAINLOOM_ACCESS_TOKEN_TTL")
    refresh_token_ttl: float = Field(30 * 86400.0, alias="CHAINLOOM_REFRESH_TOKEN_TTL")
    # Anyone may create a tenant through /register while this is on.
    registration_open: bool = Field(True, alias="CHAINLOOM_REGISTRATION_OPEN")
    # The /ui/* session cookie is sent over HTTPS only when on; browsers treat localhost as
    # secure, so the default works for local development too.
    cookie_secure: bool = Field(True, alias="CHAINLOOM_COOKIE_SECURE")

    # Rate limits ("N/second|minute|hour|day", the limits library's notation): per API key or
    # user, per tenant, and (login) per client address on /login, /register, token refresh
    # and logout, per email on /login, and per address on failed authentication.
    rate_limit: str = Field("600/minute", alias="CHAINLOOM_RATE_LIMIT")
    tenant_rate_limit: str = Field("3000/minute", alias="CHAINLOOM_TENANT_RATE_LIMIT")
    login_rate_limit: str = Field("10/minute", alias="CHAINLOOM_LOGIN_RATE_LIMIT")
    # Rate-limit counters live in Redis when set (shared by every API process), else in memory.
    redis_url: str = Field("", alias="REDIS_URL")
    # Monthly quotas per tenant (0 = unlimited); a tenant's own values override these.
    request_quota: int = Field(0, alias="CHAINLOOM_MONTHLY_REQUEST_QUOTA")
    token_quota: int = Field(0, alias="CHAINLOOM_MONTHLY_TOKEN_QUOTA")

    # /activity and /audit entries older than this many days are deleted (0 keeps them all).
    request_log_days: float = Field(90.0, alias="CHAINLOOM_REQUEST_LOG_DAYS")

    # Request limits (docs/operations.md): request bodies (413 beyond; per-route overrides in
    # api/body_limit.py), the encoded chain and input of one run (Temporal refuses payloads
    # over 2 MiB, and a run's result repeats its input several times), and the peers whose
    # X-Forwarded-For/-Proto are believed (IPs or CIDRs).
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, alias="CHAINLOOM_MAX_BODY_BYTES")
    max_run_input_bytes: int = Field(256 * 1024, ge=1, alias="CHAINLOOM_MAX_RUN_INPUT_BYTES")
    trusted_proxies: str = Field("", alias="CHAINLOOM_TRUSTED_PROXIES")

    # /ready checks Qdrant only when this is set.
    qdrant_url: str = Field("", alias="CHAINLOOM_QDRANT_URL")
    ready_timeout: float = Field(2.0, alias="CHAINLOOM_READY_TIMEOUT")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'chainloom.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
