"""Settings, read from the environment in one place.

Every variable has a local default that needs no server: SQLite for the database and
an embedded SQLite broker for Celery, so ``python manage.py demo`` works on a bare
machine. Production sets ``DATABASE_URL``, ``CELERY_BROKER_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import environ
from django.core.exceptions import ImproperlyConfigured

from agents_project import topology

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

VAR_DIR = Path(env.str("AGENTS_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

DEVELOPMENT_SECRET_KEY = "insecure-local-development-key-change-me"
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default=DEVELOPMENT_SECRET_KEY)
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    # Admin login lockout (AXES_* below).
    "axes",
    "agents",
    "tools",
    "audit",
    "llm",
    "evals",
    "rollout",
    "demo",
]

MIDDLEWARE = [
    # HTTP metrics (django_http_*): the first and the last middleware, to time them all.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # One span per request when tracing is on (agents_project/tracing.py); else removed.
    "agents_project.tracing.request_middleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and the API docs' static files from the web process itself
    # (after collectstatic), so a deployment needs no separate file server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Answers a locked-out admin login with 429 (after everything that may authenticate).
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

# Admin (session) logins go through django-axes first: AXES_FAILURE_LIMIT failed logins
# of one username from one address lock that pair out for AXES_COOLOFF_TIME (hours), a
# right password included; a success resets the count. Failures are kept in the database
# (axes' AccessAttempt, visible in the admin); `manage.py axes_reset` lifts every lockout.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = env.float("AXES_COOLOFF_TIME", default=0.25)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# No start-up banner: a process's log says what it does, not which library it loaded.
AXES_VERBOSE = False

ROOT_URLCONF = "agents_project.urls"
WSGI_APPLICATION = "agents_project.wsgi.application"
ASGI_APPLICATION = "agents_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'agents.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The demo runs a worker process beside the command that started it, so two
    # processes write one file: WAL lets readers run beside the writer, IMMEDIATE
    # takes the write lock at BEGIN (no upgrade deadlock), and the timeout waits it out.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=600)
    # A reused connection is checked before use, so a worker survives a database restart.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # Parameters bound by the server, and statements prepared once a connection has run
    # them DB_PREPARE_THRESHOLD times, so PostgreSQL stops parsing and planning the ones
    # a worker sends on every step (Django's PostgreSQL notes, "Server-side parameters
    # binding"; psycopg's prepare_threshold, which Django sets to None, preparing
    # nothing, unless told). "none" behind a pooler in transaction mode.
    DATABASES["default"].setdefault("OPTIONS", {})["server_side_binding"] = env.bool(
        "DB_SERVER_SIDE_BINDING", default=True
    )
    # JIT off for the app's connections: its short OLTP queries never pay back the
    # compile time, which the planner's cost estimate of a list page's subqueries can
    # trigger (seconds of JIT on a page that reads 50 rows; issue 24). DB_JIT=on to undo.
    # And the cost of a random page read as on SSDs (PostgreSQL's default, 4, assumes
    # spinning disks): the error search's few thousand matches are then fetched by
    # index, not by reading the whole task table. DB_RANDOM_PAGE_COST="" keeps the
    # server's setting.
    _session = [DATABASES["default"]["OPTIONS"].get("options", "")]
    if not env.bool("DB_JIT", default=False):
        _session.append("-c jit=off")
    _page_cost = env.str("DB_RANDOM_PAGE_COST", default="1.1")
    if _page_cost:
        _session.append(f"-c random_page_cost={float(_page_cost)}")
    DATABASES["default"]["OPTIONS"]["options"] = " ".join(filter(None, _session))
    _threshold = env.str("DB_PREPARE_THRESHOLD", default="2")
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = (
        None if _threshold.lower() in {"", "none", "off"} else int(_threshold)
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery (the CELERY_ namespace is read by agents_project/celery.py) ---------------

CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL", default=f"embedded+sqlite:///{VAR_DIR / 'broker.sqlite3'}"
)
BROKER_IS_AMQP = CELERY_BROKER_URL.split("://", 1)[0] in {"amqp", "amqps", "pyamqp"}

CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_DELIVERY_MODE = "persistent"
# Workers wait for the broker, at start and after losing it, however long it takes
# (Celery's default gives up after 100 attempts and the worker exits).
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# How long the worker waits for the result of a pool process that died before declaring
# it lost and giving its message back. Steps publish no results, so waiting the default
# 10 s only delays recovery.
CELERY_WORKER_LOST_WAIT = env.float("CELERY_WORKER_LOST_WAIT", default=1.0)
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
CELERY_DB_REUSE_MAX = 1000
# AMQP heartbeat of a worker's consuming connection, in seconds (0: none). RabbitMQ
# closes a connection that missed two of them and returns its unacknowledged messages
# to the queue: a worker cut off from the broker gives its steps back within about
# twice this. Celery asks 120 s by default, and RabbitMQ's 60 s offer wins.
CELERY_BROKER_HEARTBEAT = env.float("AGENTS_BROKER_HEARTBEAT", default=10.0)
if BROKER_IS_AMQP:
    # Wait for the broker's confirm on every publish: a step is only handed over once
    # RabbitMQ has taken responsibility for it.
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"confirm_publish": True}
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"polling_interval": 0.05}

# --- Redis (shared fast state: circuit breakers, rate counters) -----------------------

REDIS_URL = env.str("REDIS_URL", default="")
# Every key this deployment writes in Redis starts with this (breakers, throttle
# counters), so that two deployments or test runs can share one Redis database.
REDIS_KEY_PREFIX = env.str("AGENTS_REDIS_KEY_PREFIX", default="agents")

# --- The runtime ------------------------------------------------------------------------

AGENTS = {
    # Work queue and its dead-letter topology (declared by agents/worker.py).
    "QUEUE": env.str("AGENTS_QUEUE", default="agents.steps"),
    "DEAD_LETTER_EXCHANGE": env.str("AGENTS_DEAD_LETTER_EXCHANGE", default="agents.dlx"),
    "DEAD_LETTER_QUEUE": env.str("AGENTS_DEAD_LETTER_QUEUE", default="agents.dead"),
    # RabbitMQ's own backstop: a message returned this many times goes to the DLQ.
    "DELIVERY_LIMIT": env.int("AGENTS_DELIVERY_LIMIT", default=10),
    # Where a step hands its wait to another process (agents/core/handoffs.py; the model
    # gateway, manage.py llm_gateway, consumes it).
    "HANDOFF_QUEUE": env.str("AGENTS_HANDOFF_QUEUE", default=""),
    # The operator's trace viewer's page of a trace, with ``{trace_id}`` (the admin's task
    # page links to it), e.g. http://jaeger:16686/trace/{trace_id}. Tracing itself is
    # configured by the OTEL_* variables (agents_project/tracing.py).
    "TRACE_URL_TEMPLATE": env.str("AGENTS_TRACE_URL_TEMPLATE", default=""),
    # Seconds a handed-off step waits in that queue before the stuck-task sweep may
    # take it back (the gateway is down or far behind).
    "HANDOFF_PATIENCE": env.float("AGENTS_HANDOFF_PATIENCE", default=300.0),
    # Backpressure: beyond this many ready messages, publishes are refused.
    "QUEUE_MAX_LENGTH": env.int("AGENTS_QUEUE_MAX_LENGTH", default=100_000),
    # Step time limits, in seconds (an agent may set its own).
    "STEP_SOFT_TIME_LIMIT": env.float("AGENTS_STEP_SOFT_TIME_LIMIT", default=240.0),
    "STEP_TIME_LIMIT": env.float("AGENTS_STEP_TIME_LIMIT", default=300.0),
    # Retries of a failing step (an agent may set its own).
    "MAX_RETRIES": env.int("AGENTS_MAX_RETRIES", default=5),
    "RETRY_BACKOFF": env.float("AGENTS_RETRY_BACKOFF", default=1.0),
    "RETRY_BACKOFF_MAX": env.float("AGENTS_RETRY_BACKOFF_MAX", default=600.0),
    # A step whose process died (or hit its hard time limit) this many times is
    # dead-lettered; a broker reconnect or a graceful shutdown does not count.
    "MAX_WORKER_LOSSES": env.int("AGENTS_MAX_WORKER_LOSSES", default=3),
    # Seconds a step's lease lives without a heartbeat (renewed every sixth of it while
    # the step runs): how long a step whose process died on another machine waits to be
    # taken over (on the same machine the death is seen at once).
    "LEASE_TTL": env.float("AGENTS_LEASE_TTL", default=6.0),
    # Seconds past a step's lease expiry (or, for a step never claimed, past its
    # publish) before the scheduler's sweep publishes it again although a message is
    # counted in flight: its holder is taken for vanished (partitioned, or its host
    # gone) or its message for lost (agents/core/scheduler.py). Smaller: faster
    # takeover, more spare copies when a redelivery was about to arrive anyway.
    "SWEEP_GRACE": env.float("AGENTS_SWEEP_GRACE", default=10.0),
    # Per agent name, {"steps_per_delivery": N, "commit_every": K}: see Agent's docstring.
    "CHECKPOINT_POLICY": env.json("AGENTS_CHECKPOINT_POLICY", default={}),
    # Fair sharing (agents/core/admission.py): tasks of one owner admitted (pending with
    # a message, or running) at once; more wait for admission without a broker message.
    # 0: unlimited. An agent may set its own per-owner limit (max_running_per_owner).
    "OWNER_MAX_RUNNING": env.int("AGENTS_OWNER_MAX_RUNNING", default=0),
    # Bytes of task inputs each worker process keeps in memory.
    "INPUT_CACHE_BYTES": env.int("AGENTS_INPUT_CACHE_BYTES", default=32 * 1024 * 1024),
    # Seconds between two drains of RabbitMQ's dead-letter queue into DeadLetter rows.
    "DLQ_RECONCILE_INTERVAL": env.float("AGENTS_DLQ_RECONCILE_INTERVAL", default=10.0),
    # Scheduler loop run by every worker: timers, deadlines, and the stuck-task sweep.
    "SCHEDULER_INTERVAL": env.float("AGENTS_SCHEDULER_INTERVAL", default=1.0),
    # Schedules (``agents.schedules``): how late a slot may fire and still count as on
    # time (seconds), and how many missed slots ``catch_up: all`` starts at most.
    "SCHEDULE_GRACE": env.float("AGENTS_SCHEDULE_GRACE", default=60.0),
    "SCHEDULE_CATCH_UP_MAX": env.int("AGENTS_SCHEDULE_CATCH_UP_MAX", default=100),
    # How long a step waits out a database outage (holding its message) before giving up
    # and returning the message to the queue.
    "DATABASE_PATIENCE": env.float("AGENTS_DATABASE_PATIENCE", default=120.0),
    # Seconds a worker given SIGTERM lets running steps finish before it stops them (their
    # messages go back to the queue; see agents/worker.py). Keep Kubernetes'
    # terminationGracePeriodSeconds above it.
    "SHUTDOWN_GRACE": env.float("AGENTS_SHUTDOWN_GRACE", default=60.0),
    # suggest_timeouts --apply stores nothing for an agent with fewer samples than this
    # (finished steps for the step limit, finished tasks for the task deadline).
    "LEARN_MIN_SAMPLES": env.int("AGENTS_LEARN_MIN_SAMPLES", default=50),
    # Largest accepted task input, in bytes of JSON.
    "MAX_INPUT_BYTES": env.int("AGENTS_MAX_INPUT_BYTES", default=256 * 1024),
    # Deepest nesting of objects and arrays accepted in any JSON a user sends (API bodies,
    # inputs, signal payloads); deeper is a 400 naming the field, checked without recursion.
    "MAX_JSON_DEPTH": env.int("AGENTS_MAX_JSON_DEPTH", default=64),
    # Python modules that define (register) agents, imported at start-up.
    "MODULES": env.list("AGENTS_MODULES", default=[]),
    # Circuit breakers (tools/breakers.py): failures in a row that open one, and seconds
    # it stays open before one trial call is let through.
    "BREAKER_FAIL_MAX": env.int("AGENTS_BREAKER_FAIL_MAX", default=5),
    "BREAKER_RESET_TIMEOUT": env.float("AGENTS_BREAKER_RESET_TIMEOUT", default=30.0),
    # Tool calls go through their owner's own breaker (``<name>@owner:<id>``) inside the
    # shared one, which opens only when its failures in a row come from at least this
    # many distinct owners within the window (seconds): one tenant cannot trip it.
    "BREAKER_SHARED_MIN_OWNERS": env.int("AGENTS_BREAKER_SHARED_MIN_OWNERS", default=2),
    "BREAKER_OWNER_WINDOW": env.float("AGENTS_BREAKER_OWNER_WINDOW", default=60.0),
    # Fernet keys for credentials at rest (tools/credentials.py), comma-separated: the
    # first encrypts, every one decrypts (rotation). Required in production.
    "CREDENTIALS_KEYS": env.list("AGENTS_CREDENTIALS_KEY", default=[]),
    # The outbound-request policy of tools' HTTP calls (tools/outbound.py): hosts
    # (``*.example.com``), addresses or CIDRs that may be reached although not public.
    "OUTBOUND_ALLOW": env.list("AGENTS_OUTBOUND_ALLOW", default=[]),
    # Largest response body a tool's HTTP call reads, in bytes, and redirects followed.
    "OUTBOUND_MAX_BYTES": env.int("AGENTS_OUTBOUND_MAX_BYTES", default=1024 * 1024),
    "OUTBOUND_MAX_REDIRECTS": env.int("AGENTS_OUTBOUND_MAX_REDIRECTS", default=5),
    # MCP tool servers (tools/mcp.py): seconds a call may take unless the server says
    # (mcp_servers add --timeout), seconds a discovered tool list is used before it is
    # read again (0: until mcp_servers refresh), seconds a process keeps the server rows
    # it read (a change reaches every worker within this).
    "MCP_CALL_TIMEOUT": env.float("AGENTS_MCP_CALL_TIMEOUT", default=30.0),
    "MCP_TOOLS_TTL": env.float("AGENTS_MCP_TOOLS_TTL", default=3600.0),
    "MCP_CACHE_SECONDS": env.float("AGENTS_MCP_CACHE_SECONDS", default=10.0),
    # Tool calls of one step (a model's reply) that run at the same time, at most.
    "TOOL_CONCURRENCY": env.int("AGENTS_TOOL_CONCURRENCY", default=4),
    # Quotas of the kv.set tool per owner: bytes of one value, keys over all scopes.
    "KV_MAX_VALUE_BYTES": env.int("AGENTS_KV_MAX_VALUE_BYTES", default=64 * 1024),
    "KV_MAX_KEYS": env.int("AGENTS_KV_MAX_KEYS", default=1000),
    # Keys of the audit trail's hash chain and anchors (audit/integrity.py), comma-
    # separated: the first signs, every one verifies (rotation: NEW,OLD). Required in
    # production; elsewhere derived from DJANGO_SECRET_KEY when unset. Keep it out of the
    # database's reach, and keep an old key listed as long as events it signed are kept
    # ("derived": the key used while this was unset).
    "AUDIT_KEY": env.str("AGENTS_AUDIT_KEY", default=""),
    # The anchor log (audit/anchor.py): where audit_anchor appends, and what
    # audit_verify checks, unless --to / --anchors say otherwise ("": none).
    "AUDIT_ANCHOR_FILE": env.str("AGENTS_AUDIT_ANCHOR_FILE", default=""),
    # Failed API token authentications counted per client address and per token prefix
    # (agents/api/authentication.py): past LIMIT within WINDOW seconds, 429 with
    # Retry-After (0: no limit). API tokens expire this many seconds after creation
    # (0: never); POST /api/token/rotate/ or drf_create_token --reset makes a new one.
    "AUTH_FAIL_LIMIT": env.int("AGENTS_AUTH_FAIL_LIMIT", default=20),
    "AUTH_FAIL_WINDOW": env.int("AGENTS_AUTH_FAIL_WINDOW", default=60),
    "API_TOKEN_MAX_AGE": env.int("AGENTS_API_TOKEN_MAX_AGE", default=90 * 24 * 3600),
    # Workers serve /healthz and /readyz on this port (0: off), see tools/health.py.
    "WORKER_HEALTH_PORT": env.int("AGENTS_WORKER_HEALTH_PORT", default=0),
    "WORKER_HEALTH_HOST": env.str("AGENTS_WORKER_HEALTH_HOST", default="0.0.0.0"),
    # GET /api/tasks/{id}/events/ (agents/events.py): seconds between polls of the audit
    # trail, and the longest a stream stays open before the client must reconnect.
    "EVENTS_POLL_INTERVAL": env.float("AGENTS_EVENTS_POLL_INTERVAL", default=0.5),
    # Under ASGI a stream closes after MAX_SECONDS in all, or IDLE_SECONDS without a new
    # event (the client resumes with Last-Event-ID); at most MAX_STREAMS_PER_USER open
    # per user and MAX_STREAMS in all (0: no limit), 429 beyond (agents/api/streams.py).
    "EVENTS_MAX_SECONDS": env.float("AGENTS_EVENTS_MAX_SECONDS", default=900.0),
    "EVENTS_IDLE_SECONDS": env.float("AGENTS_EVENTS_IDLE_SECONDS", default=300.0),
    "EVENTS_MAX_STREAMS": env.int("AGENTS_EVENTS_MAX_STREAMS", default=50),
    "EVENTS_MAX_STREAMS_PER_USER": env.int("AGENTS_EVENTS_MAX_STREAMS_PER_USER", default=4),
    "EVENTS_HEARTBEAT": env.float("AGENTS_EVENTS_HEARTBEAT", default=15.0),
    # Version-pinned runs (agents/core/versions.py): seconds a worker's announcement of
    # the agent versions it serves stays live, and the share of new tasks (percent) per
    # agent and version during a ramp, e.g. {"refunds": {"2": 10}}.
    "WORKER_TTL": env.float("AGENTS_WORKER_TTL", default=15.0),
    "VERSION_RAMP": env.json("AGENTS_VERSION_RAMP", default={}),
    # development | test | production. Fault injection needs "test".
    "ENVIRONMENT": env.str("AGENTS_ENVIRONMENT", default="development"),
    # Crash-test hook, see agents/core/faults.py: POINT or POINT@STEP.
    "FAULT_INJECTION": env.str("AGENTS_FAULT_INJECTION", default=""),
}
if AGENTS["FAULT_INJECTION"] and AGENTS["ENVIRONMENT"] != "test":
    raise ImproperlyConfigured(
        "AGENTS_FAULT_INJECTION kills worker processes on purpose; it is refused unless "
        "AGENTS_ENVIRONMENT=test"
    )

_ramp = AGENTS["VERSION_RAMP"]
if not isinstance(_ramp, dict) or not all(
    isinstance(shares, dict)
    and all(
        isinstance(p, int | float) and not isinstance(p, bool) and 0 <= p <= 100
        for p in shares.values()
    )
    and sum(shares.values()) <= 100
    for shares in _ramp.values()
):
    raise ImproperlyConfigured(
        'AGENTS_VERSION_RAMP must be {"agent": {"version": percent}}, percents 0..100 '
        "summing to at most 100 per agent"
    )

# --- Retention and archival (agents/retention.py) -------------------------------------
# AGENTS_RETENTION is JSON: {"default": POLICY, "agents": {NAME: POLICY}, "owners":
# {USERNAME: POLICY}, "interval": seconds between two runs in each worker (0: never),
# "batch": tasks per run, "partition_purge_after_days": see agents.retention}. A
# POLICY has "mode" (keep | keep_latest | archive_and_remove) and "archive_after_days"
# (days after the task finished); an owner's policy overrides an agent's, which
# overrides the default, field by field.
# The default keeps everything: nothing is removed until a policy says so.
RETENTION_MODES = ("keep", "keep_latest", "archive_and_remove")
AGENTS["RETENTION"] = env.json("AGENTS_RETENTION", default={})


def _retention_check(value: Any) -> dict[str, Any]:
    def refuse(where: str, what: str) -> NoReturn:
        raise ImproperlyConfigured(f"AGENTS_RETENTION: {where}: {what}")

    if not isinstance(value, dict):
        refuse("the setting", "must be a JSON object")
    known = {"default", "agents", "owners", "interval", "batch", "partition_purge_after_days"}
    unknown = set(value) - known
    if unknown:
        refuse(", ".join(sorted(unknown)), f"unknown key ({', '.join(sorted(known))})")

    def policy(where: str, item: Any) -> None:
        if not isinstance(item, dict):
            refuse(where, "must be an object")
        extra = set(item) - {"mode", "archive_after_days"}
        if extra:
            refuse(f"{where}.{sorted(extra)[0]}", "unknown key (mode, archive_after_days)")
        if "mode" in item and item["mode"] not in RETENTION_MODES:
            refuse(f"{where}.mode", f"{item['mode']!r} is not one of {', '.join(RETENTION_MODES)}")
        days = item.get("archive_after_days", 0)
        if isinstance(days, bool) or not isinstance(days, int | float) or days < 0:
            refuse(f"{where}.archive_after_days", "must be a number of days >= 0")

    policy("default", value.get("default", {}))
    for scope in ("agents", "owners"):
        rules = value.get(scope, {})
        if not isinstance(rules, dict):
            refuse(scope, "must be an object of NAME: POLICY")
        for name, item in rules.items():
            policy(f"{scope}.{name}", item)
    purge = value.get("partition_purge_after_days", 0)
    if isinstance(purge, bool) or not isinstance(purge, int | float) or purge < 0:
        refuse("partition_purge_after_days", "must be a number of days >= 0")
    for key, default in (("interval", 3600), ("batch", 20)):
        number = value.setdefault(key, default)
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            refuse(key, "must be a number >= 0")
    return value


_retention_check(AGENTS["RETENTION"])

# Where archives go: a Django storage, FileSystemStorage under var/archive by default,
# or django-storages' S3 backend (AGENTS_ARCHIVE_BACKEND=storages.backends.s3.S3Storage
# and AGENTS_ARCHIVE_OPTIONS={"bucket_name": ..., "endpoint_url": ...}).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "retention": {
        "BACKEND": env.str(
            "AGENTS_ARCHIVE_BACKEND", default="django.core.files.storage.FileSystemStorage"
        ),
        "OPTIONS": env.json("AGENTS_ARCHIVE_OPTIONS", default={})
        or {"location": str(VAR_DIR / "archive"), "allow_overwrite": True},
    },
}

# --- LLM agents (llm/): the model server, per-model settings, budgets ------------------

# AGENTS_LLM_MODELS is JSON, per model name: base_url, api_key_credential (the name of a
# credential of the task's owner holding the key), context_window (tokens), price
# {"input", "output"} per million tokens, timeout (s), rpm and tpm (requests and tokens
# per minute, shared by every worker through Redis). See llm/client.py.
LLM = {
    "BASE_URL": env.str("AGENTS_LLM_BASE_URL", default=""),
    "MODEL": env.str("AGENTS_LLM_MODEL", default=""),
    "API_KEY": env.str("AGENTS_LLM_API_KEY", default=""),
    # Empty (compose passes it through unset as ""): no per-model settings.
    "MODELS": env.json("AGENTS_LLM_MODELS", default={})
    if env.str("AGENTS_LLM_MODELS", default="")
    else {},
    # Tokens an owner's tasks may use per UTC day, together (0: no limit).
    "OWNER_DAILY_TOKENS": env.int("AGENTS_LLM_OWNER_DAILY_TOKENS", default=0),
    # Seconds a model request may take, unless the model's own "timeout" says otherwise.
    "TIMEOUT": env.float("AGENTS_LLM_TIMEOUT", default=120.0),
    # Model calls go through the model gateway (manage.py llm_gateway; llm/gateway.py):
    # a step prepares its request and ends, and no pool process waits on the model.
    # Needs RabbitMQ; off, each call is made by the worker's pool process itself.
    "GATEWAY": env.bool("AGENTS_LLM_GATEWAY", default=False),
    # The gateway: seconds a SIGTERM lets in-flight calls finish before it hands them
    # back; how many threads (and database connections) it runs its database work on;
    # how many hand-off messages it takes from the queue at once.
    "GATEWAY_DRAIN": env.float("AGENTS_LLM_GATEWAY_DRAIN", default=25.0),
    "GATEWAY_DB_THREADS": env.int("AGENTS_LLM_GATEWAY_DB_THREADS", default=8),
    "GATEWAY_PREFETCH": env.int("AGENTS_LLM_GATEWAY_PREFETCH", default=5000),
    # Steps the gateway runs at once itself (``llm.gateway.Gateway._continue``): a reply
    # that calls no tool or only local ones, taken while fewer run; 0: every reply
    # goes back through the work queue.
    "GATEWAY_CONTINUE": env.int("AGENTS_LLM_GATEWAY_CONTINUE", default=2),
    "GATEWAY_HEALTH_PORT": env.int("AGENTS_LLM_GATEWAY_HEALTH_PORT", default=8002),
    # Without Redis (the demo), streamed replies' deltas are appended to this file.
    "DELTAS_FILE": env.str("AGENTS_LLM_DELTAS_FILE", default=""),
}
if not isinstance(LLM["MODELS"], dict):
    raise ImproperlyConfigured("AGENTS_LLM_MODELS must be a JSON object keyed by model name")
# The model names are the allow-list, matched exactly: a name with spaces around it
# would be a twin of another that no one meant to allow.
for _name, _model in {LLM["MODEL"]: {}, **LLM["MODELS"]}.items():
    if _name != _name.strip() or (not _name and _name in LLM["MODELS"]):
        raise ImproperlyConfigured(
            f"AGENTS_LLM_MODELS / AGENTS_LLM_MODEL: model name {_name!r} is empty or has "
            "spaces around it"
        )
    _price = _model.get("price") if isinstance(_model, dict) else None
    if not isinstance(_model, dict) or (
        _price is not None
        and not (
            isinstance(_price, dict)
            and set(_price) == {"input", "output"}
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                for v in _price.values()
            )
        )
    ):
        raise ImproperlyConfigured(
            f"AGENTS_LLM_MODELS[{_name!r}] must be an object; its price, if given, "
            '{"input": number >= 0, "output": number >= 0} per million tokens'
        )

# --- HTTP, static files, i18n ---------------------------------------------------------

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"  # filled by collectstatic; served by WhiteNoise
STATIC_ROOT.mkdir(exist_ok=True)
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Logging: structured, one JSON-ish line per event ---------------------------------

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "structured": {"()": "agents_project.logs.formatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "structured"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "celery": {"level": env.str("CELERY_LOG_LEVEL", default="WARNING")},
        "django.db.backends": {"level": "WARNING"},
    },
}

# The work queue (and, on RabbitMQ, its dead-letter topology): agents_project/topology.py
CELERY_TASK_QUEUES = (topology.work_queue(AGENTS, amqp=BROKER_IS_AMQP),)
# Celery's remote control (inspect, ping, Flower, the worker health check) broadcasts on
# this exchange: a deployment's own (AGENTS_CONTROL_EXCHANGE, by default named after its
# work queue), so it reaches only its own workers, never another deployment's or test
# run's on the same virtual host.
CELERY_CONTROL_EXCHANGE = env.str("AGENTS_CONTROL_EXCHANGE", default=f"{AGENTS['QUEUE']}.control")
CELERY_TASK_DEFAULT_QUEUE = AGENTS["QUEUE"]
AGENTS["HANDOFF_QUEUE"] = AGENTS["HANDOFF_QUEUE"] or f"{AGENTS['QUEUE']}.handoff"
CELERY_TASK_CREATE_MISSING_QUEUES = False

# --- Operator API, console and metrics (agents/api/, agents/admin.py, metrics.py) -----

REST_FRAMEWORK = {
    # Token first: an unauthenticated request gets 401 with "WWW-Authenticate: Token".
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Failed token authentications counted per address and token prefix (429 past
        # AGENTS_AUTH_FAIL_LIMIT), tokens expiring after AGENTS_API_TOKEN_MAX_AGE.
        "agents.api.authentication.ThrottledTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only (strict: no NaN or Infinity; nested at most AGENTS_MAX_JSON_DEPTH levels,
    # checked before parsing). DRF reads it through request.body, so
    # DATA_UPLOAD_MAX_MEMORY_SIZE applies: a larger body is refused with 413.
    "DEFAULT_PARSER_CLASSES": ["agents.api.parsers.JSONParser"],
    "DEFAULT_PAGINATION_CLASS": "agents.api.pagination.NewestFirstPagination",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["agents.api.throttling.PerUserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env.str("API_THROTTLE_RATE", default="600/minute")},
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "agents.api.errors.exception_handler",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agent runtime API",
    "DESCRIPTION": "Start, follow and operate agent tasks. Errors share one shape: Error.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"TaskStatusEnum": "agents.models.TaskStatus"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "agents.api.schema.add_common_error_responses",
    ],
    # Swagger UI's assets are served by this deployment (drf-spectacular-sidecar, through
    # WhiteNoise): the page works on a closed network, and loads nothing from elsewhere.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
# A request body larger than this is refused (413) before it is parsed. It leaves room
# for an input near AGENTS_MAX_INPUT_BYTES sent with \u escapes, so that such an input
# gets the service's clearer 400 naming "input".
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int(
    "DATA_UPLOAD_MAX_MEMORY_SIZE", default=4 * AGENTS["MAX_INPUT_BYTES"] + 64 * 1024
)
# Throttle counters must be shared by every web process: Redis when there is one. The
# cache's keys have their own prefix, and clearing it deletes only those (Django's own
# backend would FLUSHDB, dropping the breakers and rate limits too: agents_project.cache).
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "agents_project.cache.PrefixedRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{REDIS_KEY_PREFIX}:cache",
        }
    }
# Worker processes serve their step metrics on this port (0: off); see metrics.py.
METRICS_PORT = env.int("AGENTS_METRICS_PORT", default=0)
# Each scrape-time source (database, broker, breakers) answers within this many seconds
# or is reported down (agents_metrics_source_up 0); keep it below the scrape timeout.
METRICS_SOURCE_TIMEOUT = env.float("AGENTS_METRICS_SOURCE_TIMEOUT", default=2.0)
# What /metrics reads at scrape time: a source name (agents_metrics_source_up{source}) to
# the dotted path of a function returning Prometheus metric families.
METRICS_SOURCES = {
    "database": "agents.metrics.database_metrics",
    "broker": "agents_project.metrics.queue_metrics",
    "breakers": "tools.metrics.breaker_metrics",
}
# django-prometheus: no migration gauges (they would query the database at start-up).
PROMETHEUS_EXPORT_MIGRATIONS = False
# When set, GET /metrics needs "Authorization: Bearer <token>".
METRICS_TOKEN = env.str("AGENTS_METRICS_TOKEN", default="")

# --- Production: refuse to start with public defaults; check --deploy is clean --------

if AGENTS["ENVIRONMENT"] == "production":
    _missing = []
    if SECRET_KEY == DEVELOPMENT_SECRET_KEY or len(set(SECRET_KEY)) < 5 or len(SECRET_KEY) < 50:
        _missing.append(
            "DJANGO_SECRET_KEY must be set in production to a random value of 50 or more "
            "characters (python -c 'from django.core.management.utils import "
            "get_random_secret_key; print(get_random_secret_key())')"
        )
    if not AGENTS["CREDENTIALS_KEYS"]:
        _missing.append(
            "AGENTS_CREDENTIALS_KEY must be set in production: credentials are encrypted "
            "with it, and the development key is derived from DJANGO_SECRET_KEY. Generate "
            "one with python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'"
        )
    if len(AGENTS["AUDIT_KEY"].split(",")[0].strip()) < 32:
        _missing.append(
            "AGENTS_AUDIT_KEY must be set in production to a random value of 32 or more "
            "characters (the audit trail's hash chain is keyed with it; with NEW,OLD while "
            "rotating): python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    if not METRICS_TOKEN:
        _missing.append(
            "AGENTS_METRICS_TOKEN must be set in production: /metrics names every host "
            "tenants call (scrape with Authorization: Bearer <token>)"
        )
    if _missing:
        raise ImproperlyConfigured("; ".join(_missing))
    # HTTPS only. Terminating TLS at a proxy: set SECURE_PROXY_SSL_HEADER_NAME (e.g.
    # HTTP_X_FORWARDED_PROTO) so that Django sees the original scheme. Plain HTTP with
    # nothing in front (docker/compose.yaml on one host): SECURE_SSL_REDIRECT=false,
    # the only warning check --deploy then gives (security.W008).
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    # Probes and the scraper call these over plain HTTP inside the cluster.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    if _proxy_header := env.str("SECURE_PROXY_SSL_HEADER_NAME", default=""):
        SECURE_PROXY_SSL_HEADER = (_proxy_header, "https")
