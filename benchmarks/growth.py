"""How the operator's pages, the scheduler and storage behave as tasks pile up.

    python benchmarks/growth.py [--sizes 10000,100000] [--json FILE] [--keep NAME]
                                [--repeat 7]
    python benchmarks/growth.py --measure NAME [--json FILE] [--repeat 7]

Needs PostgreSQL, RabbitMQ and Redis (URLs as in benchmarks/common.py). For each size N
it builds a private database on ``DATABASE_URL``'s server (``agents_growth_<N>``,
dropped afterwards; ``--keep NAME`` keeps the largest one, renamed NAME, for others to
measure; ``--measure NAME`` measures such a kept database again, building nothing),
shaped like real use:

- a few real tasks are run first, through the real engine, with steps taken off the
  real queue in this process: a 10-step ``scripted`` task (a task row, 11 checkpoints,
  29 audit events), one whose tool call keeps failing with "connection refused" until
  it is dead-lettered, and an ``llm`` task talking to the scripted chat-completions
  server on loopback;
- then their rows are replicated in bulk, with fresh ids, spread over a year of
  ``created_at`` and over 100 owners: N tasks (one in 50 the failing one), plus one
  task with 100,000 audit events and the LLM task's conversation grown to 5,000
  messages. Task rows and checkpoints are copied by ``INSERT ... SELECT``; each
  replicated audit trail is sealed again by the project's own chain code
  (``audit.integrity.event_hash``) and written with ``COPY``.

Then it measures each operation (median of ``--repeat`` requests after a warm-up, in
ms): the admin's task list, its search ``error:refused``, its page 100, the audit-event
list; the API's task list for an operator who sees every task and a deep page of it;
a ``/metrics`` scrape; one scheduler tick (every query it runs); ``audit_verify`` of the
100,000-event task; an owner's task list, audit page and messages page; and the bytes
a finished task takes (``pg_total_relation_size`` of its tables, tables and indexes, per
ordinary task). Prints a Markdown table and, with ``--json``, writes
``{"sizes": {"N": {"ops": {NAME: median_ms}, "bytes_per_task": B, ...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ENV, machine  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated task counts")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--keep", help="keep the largest database, under this name")
    parser.add_argument("--repeat", type=int, default=7, help="requests per median")
    parser.add_argument(
        "--measure",
        metavar="NAME",
        help="build nothing: measure database NAME (kept by --keep; migrated first)",
    )
    parser.add_argument(
        "--prefix",
        default="agents_growth",
        help="names of the databases (PREFIX_<size>) and queues (PREFIX.agents.*)",
    )
    args = parser.parse_args()
    try:
        args.sizes = sorted(int(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error("--sizes: comma-separated integers, e.g. 10000,100000")
    if min(args.sizes) < 1:
        parser.error("--sizes: each at least 1")
    return args


ARGS = arguments() if __name__ == "__main__" else None
PREFIX = ARGS.prefix if ARGS else "agents_growth"
SERVER = ENV["DATABASE_URL"].rsplit("/", 1)[0]
os.environ.update(
    {
        **ENV,
        "DATABASE_URL": f"{SERVER}/{PREFIX}",
        "AGENTS_QUEUE": f"{PREFIX}.agents.steps",
        "AGENTS_DEAD_LETTER_EXCHANGE": f"{PREFIX}.agents.dlx",
        "AGENTS_DEAD_LETTER_QUEUE": f"{PREFIX}.agents.dead",
        # Thousands of timed requests from one user: not what the throttle is for.
        "API_THROTTLE_RATE": "100000000/minute",
        "AGENTS_METRICS_TOKEN": "",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "ERROR"),
    }
)

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework.authtoken.models import Token  # noqa: E402

from agents.core.scheduler import tick  # noqa: E402
from agents.models import AgentTask  # noqa: E402
from agents.services import task_start  # noqa: E402
from audit.integrity import event_hash  # noqa: E402
from audit.partitions import partitions_ensure  # noqa: E402
from audit.services import audit_verify  # noqa: E402
from llm.testing.chat_server import ChatServer  # noqa: E402
from tests.helpers import purge_queues, run_until_idle  # noqa: E402

OWNERS = 100
FAILING_EVERY = 50
BIG_TRAIL = 100_000
CONVERSATION = 5_000
# Tables whose rows belong to one task, replicated with it (besides the audit trail).
TASK_TABLES = ("agents_checkpoint", "agents_suspension", "agents_signal", "audit_deadletter")
# The tables a finished task takes room in (bytes per task).
STORAGE_TABLES = ("agents_agenttask", "agents_checkpoint", "audit_auditevent", "audit_deadletter")
TIME_COLUMNS = ("created_at", "updated_at", "status_changed_at", "finished_at")

SCRIPT = [
    {"think": "read the ticket"},
    {"tool": "calc", "args": {"expression": "2 + 3 * 4"}},
    {"think": "look the customer up"},
    {"tool": "ledger.append", "args": {"key": "refund", "value": 14}},
    {"think": "check the ledger"},
    {"tool": "calc", "args": {"expression": "14 * 1.2"}},
    {"think": "draft the answer"},
    {"tool": "calc", "args": {"expression": "100 - 16.8"}},
    {"think": "review the draft"},
    {"final": {"answer": "refunded 14", "ticket": 4711}},
]
FAILING_SCRIPT = [
    {"think": "read the ticket"},
    {"fail": "upstream connection refused (ECONNREFUSED 10.0.0.7:443)"},
]


# --- the database ------------------------------------------------------------------------


def use_database(name: str) -> None:
    """Point Django's connection at database ``name`` (created empty when absent)."""
    connections.close_all()
    settings.DATABASES["default"]["NAME"] = name
    connection.settings_dict["NAME"] = name


def create_database(name: str) -> None:
    with connection._nodb_cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{name}"')
    use_database(name)
    call_command("migrate", verbosity=0)


def drop_database(name: str) -> None:
    connections.close_all()
    with connection._nodb_cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sql(statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def columns(table: str) -> list[str]:
    return [
        row[0]
        for row in sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position",
            [table],
        )
    ]


# --- real runs -----------------------------------------------------------------------------


def real_runs() -> dict[str, Any]:
    """Run the template tasks through the real engine; returns their ids."""
    settings.AGENTS = {**settings.AGENTS, "RETRY_BACKOFF": 0.01, "RETRY_BACKOFF_MAX": 0.05}
    purge_queues()
    User = get_user_model()
    owner = User.objects.create_user(username="owner000")
    ok, _ = task_start(owner=owner, agent="scripted", input={"script": SCRIPT})
    failing, _ = task_start(owner=owner, agent="scripted", input={"script": FAILING_SCRIPT})
    run_until_idle(wait=0.3)
    server = ChatServer(
        script=[
            {"tool_calls": [{"name": "calc", "arguments": {"expression": f"{i} * 3 + 1"}}]}
            for i in range(3)
        ]
        + [{"content": "The results are 1, 4 and 7."}]
    )
    with server.running():
        settings.LLM = {**settings.LLM, "BASE_URL": server.url, "MODEL": "scripted"}
        llm, _ = task_start(
            owner=owner,
            agent="llm",
            input={
                "system": "You compute. Use calc for every step.",
                "prompt": "Compute 3n + 1 for n = 0, 1, 2.",
                "tools": ["calc"],
            },
        )
        run_until_idle(wait=0.3)
    statuses = {t.pk: t.status for t in AgentTask.objects.all()}
    assert statuses[ok.pk] == "completed", statuses
    assert statuses[failing.pk] == "dead_lettered", statuses
    assert statuses[llm.pk] == "completed", statuses
    return {"ok": ok.pk, "failing": failing.pk, "llm": llm.pk}


# --- replication ---------------------------------------------------------------------------


def replicate(templates: dict[str, Any], size: int) -> dict[str, Any]:
    """N tasks copied from the templates (fresh ids, a year of created_at, 100 owners),
    their trails sealed again; plus the 100,000-event task and the 5,000-message
    conversation. Returns the ids the measurements use."""
    User = get_user_model()
    owners = [User.objects.get(username="owner000")] + [
        User(username=f"owner{i:03d}") for i in range(1, OWNERS)
    ]
    User.objects.bulk_create(owners[1:])
    owner_ids = list(User.objects.filter(username__startswith="owner").values_list("pk", flat=True))
    year = timedelta(days=365).total_seconds()
    # The audit trail's month partitions over the year the tasks span (audit.0011), as
    # a database that has run that long has them.
    partitions_ensure(now=timezone.now(), since=timezone.now() - timedelta(days=366))
    sql(
        "CREATE UNLOGGED TABLE growth_map"
        " (n bigint, id uuid, template uuid, owner_id int, shift interval)"
    )
    with connection.cursor() as cursor, cursor.cursor.copy("COPY growth_map FROM STDIN") as copy:
        for n in range(size):
            template = (
                templates["failing"] if n % FAILING_EVERY == FAILING_EVERY - 1 else templates["ok"]
            )
            copy.write_row(
                (
                    n,
                    new_id(),
                    template,
                    owner_ids[n % len(owner_ids)],
                    timedelta(seconds=year * (size - n) / size),
                )
            )
    big = new_id()
    sql(
        "INSERT INTO growth_map VALUES (%s, %s, %s, %s, interval '0')",
        [size, big, templates["ok"], owner_ids[0]],
    )
    _copy_rows("agents_agenttask", key="id")
    for table in TASK_TABLES:
        _copy_rows(table, key="task_id")
    _seal_trails(templates)
    _big_trail(big, templates["ok"])
    _long_conversation(templates["llm"])
    sql("DROP TABLE growth_map")
    sql("VACUUM ANALYZE")
    return {"big": big}


def new_id() -> UUID:
    """A fresh task id, made as the project makes them (the model's default)."""
    return AgentTask._meta.pk.get_default()


def _copy_rows(table: str, *, key: str) -> None:
    """``INSERT ... SELECT`` of each mapped task's template rows of ``table``."""
    cols = [c for c in columns(table) if not (c == "id" and key != "id")]
    values = []
    for c in cols:
        if c == key:
            values.append("m.id")
        elif c == "owner_id":
            values.append("m.owner_id")
        elif c in ("idempotency_key", "replayed_from_id"):
            values.append("NULL")
        elif c in TIME_COLUMNS or c.endswith("_at") and c not in ("requeued_at",):
            values.append(f"t.{c} - m.shift")
        else:
            values.append(f"t.{c}")
    sql(
        f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(values)} "  # noqa: S608
        f"FROM growth_map m JOIN {table} t ON t.{key} = m.template"
    )


def _template_events(task_id: UUID) -> list[tuple[Any, ...]]:
    return sql(
        "SELECT seq, type, step, payload::text, actor, created_at FROM audit_auditevent "
        "WHERE task_id = %s ORDER BY seq",
        [task_id],
    )


def _hash_column(value: str) -> Any:
    return (
        bytes.fromhex(value) if HASH_IS_BYTES and value else (value if not HASH_IS_BYTES else None)
    )


def _write_events(rows: Iterator[tuple[Any, ...]]) -> None:
    with (
        connection.cursor() as cursor,
        cursor.cursor.copy(
            "COPY audit_auditevent (task_id, seq, type, step, payload, actor, created_at, "
            "hash) FROM STDIN"
        ) as copy,
    ):
        for row in rows:
            copy.write_row(row)


def _sealed(
    task_id: UUID, events: list[tuple[Any, ...]], shift: timedelta
) -> Iterator[tuple[Any, ...]]:
    """The template's events as task ``task_id``'s, ``shift`` earlier, chained by the
    project's own ``event_hash``."""
    prev = ""
    for seq, type_, step, payload_text, payload, actor, created in events:
        at = created - shift
        digest = event_hash(
            prev_hash=prev,
            task_id=task_id,
            seq=seq,
            type=type_,
            step=step,
            actor=actor,
            created_at=at,
            payload=payload,
        )
        yield (
            task_id,
            seq,
            type_,
            step,
            payload_text,
            actor,
            at,
            _hash_column(digest),
        )
        prev = digest


def _seal_trails(templates: dict[str, Any]) -> None:
    trails = {
        t: [(s, ty, st, p, json.loads(p), a, c) for s, ty, st, p, a, c in _template_events(t)]
        for t in (templates["ok"], templates["failing"])
    }
    mapped = sql(
        "SELECT id, template, shift FROM growth_map WHERE n < (SELECT max(n) FROM growth_map)"
    )

    def rows() -> Iterator[tuple[Any, ...]]:
        for task_id, template, shift in mapped:
            yield from _sealed(task_id, trails[template], shift)

    _write_events(rows())


def _big_trail(task_id: UUID, template: UUID) -> None:
    """Task ``task_id`` gets ``BIG_TRAIL`` events: the template's, over and over."""
    base = _template_events(template)
    events = []
    for seq in range(1, BIG_TRAIL + 1):
        _, type_, step, payload_text, actor, created = base[(seq - 1) % len(base)]
        events.append(
            (
                seq,
                type_,
                step,
                payload_text,
                json.loads(payload_text),
                actor,
                created + timedelta(milliseconds=seq),
            )
        )
    _write_events(_sealed(task_id, events, timedelta(0)))
    sql("UPDATE agents_agenttask SET audit_seq = %s WHERE id = %s", [BIG_TRAIL, task_id])


def _long_conversation(task_id: UUID) -> None:
    """The LLM task's conversation, its messages repeated (with the next sequence
    numbers) up to ``CONVERSATION`` messages."""
    cols = [c for c in columns("llm_message") if c not in ("id", "seq")]
    have, last = sql("SELECT count(*), max(seq) FROM llm_message WHERE task_id = %s", [task_id])[0]
    sql(
        "WITH base AS (SELECT *, row_number() OVER (ORDER BY seq) - 1 AS k"  # noqa: S608
        " FROM llm_message WHERE task_id = %s) "
        f"INSERT INTO llm_message (seq, {', '.join(cols)}) "
        f"SELECT %s::int + g, {', '.join('m.' + c for c in cols)}"
        " FROM generate_series(1, %s::int) g JOIN base m ON m.k = (g - 1) %% %s::int",
        [task_id, last, CONVERSATION - have, have],
    )


# --- measuring -----------------------------------------------------------------------------


def median_ms(action: Callable[[], object], repeat: int) -> float:
    action()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        runs.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(runs), 1)


def get(client: Client, url: str, headers: dict[str, str] | None = None) -> Callable[[], object]:
    def request() -> object:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, (url, response.status_code, response.content[:300])
        return response

    return request


def admin_page_url(page: int) -> str:
    """The URL of the admin task list's page ``page`` (1 = first; the last one when
    there are fewer), reached by following its "next" links as an operator would."""
    client = Client()
    client.force_login(get_user_model().objects.get(username="operator"))
    base = url = "/admin/agents/agenttask/"
    for _ in range(page - 1):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        if not hasattr(response.context["cl"], "next_page_url"):
            return f"{url}?p={page}"  # numbered pages (before keyset paging)
        following = response.context["cl"].next_page_url
        if following is None:
            break
        url = base + following
    return url


def api_deep_url(client: Client, headers: dict[str, str], pages: int) -> str:
    url = "/api/tasks/?page_size=50"
    for _ in range(pages - 1):
        following = client.get(url, headers=headers).json()["next"]
        if following is None:
            break
        url = following
    return url


def measure(ids: dict[str, Any], repeat: int) -> dict[str, float]:
    User = get_user_model()
    operator = User.objects.filter(username="operator").first()
    if operator is None:  # a kept database measured again has one
        operator = User.objects.create_superuser(username="operator", password="x")
    admin = Client()
    admin.force_login(operator)
    api = Client()
    staff = {"Authorization": f"Token {Token.objects.get_or_create(user=operator)[0].key}"}
    owner = User.objects.get(username="owner000")
    mine = {"Authorization": f"Token {Token.objects.get_or_create(user=owner)[0].key}"}
    big, llm = ids["big"], ids["llm"]
    ops: dict[str, Callable[[], object]] = {
        "admin task list": get(admin, "/admin/agents/agenttask/"),
        "admin search error:refused": get(admin, "/admin/agents/agenttask/?q=error:refused"),
        "admin page 100": get(admin, admin_page_url(100)),
        "admin audit-event list": get(admin, "/admin/audit/auditevent/"),
        "API task list, operator": get(api, "/api/tasks/", staff),
        "API deep page, operator": get(api, api_deep_url(api, staff, 100), staff),
        "/metrics scrape": get(api, "/metrics"),
        "scheduler tick": lambda: tick(actor="scheduler:growth"),
        "API task list, one owner": get(api, "/api/tasks/", mine),
        "API audit page, one owner": get(
            api, f"/api/tasks/{big}/audit/?after={BIG_TRAIL // 2}&limit=100", mine
        ),
        "API messages page, one owner": get(
            api, f"/api/tasks/{llm}/messages/?after={CONVERSATION // 2}&limit=100", mine
        ),
    }
    figures = {name: median_ms(action, repeat) for name, action in ops.items()}

    def verify() -> None:
        report = audit_verify(tasks=[(big, BIG_TRAIL)])
        assert not report.breaks, report.breaks[:3]

    figures["audit_verify, 100,000-event task"] = median_ms(verify, max(1, min(repeat, 3)))
    return figures


def storage() -> dict[str, Any]:
    """Bytes per ordinary finished task: the tables' total size (heap, TOAST, indexes),
    less the share of the big trail's events, over the ordinary tasks."""
    # A partitioned table (the audit trail, audit.0011) is the sum of its partitions.
    sizes = dict(
        sql(
            "SELECT c.relname::text, coalesce("
            " (SELECT sum(pg_total_relation_size(p.relid))::bigint"
            "    FROM pg_partition_tree(c.oid) AS p WHERE p.isleaf),"
            " pg_total_relation_size(c.oid))"
            " FROM pg_class AS c WHERE c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
            [list(STORAGE_TABLES)],
        )
    )
    events = sql("SELECT count(*) FROM audit_auditevent")[0][0]
    tasks = sql("SELECT count(*) FROM agents_agenttask")[0][0] - 1
    ordinary_events = events - BIG_TRAIL
    sizes["audit_auditevent"] = sizes["audit_auditevent"] * ordinary_events / events
    per_table = {t: round(sizes[t] / tasks) for t in STORAGE_TABLES}
    return {"bytes_per_task": sum(per_table.values()), "bytes_per_task_by_table": per_table}


def one_size(size: int, repeat: int, keep: str | None) -> dict[str, Any]:
    global HASH_IS_BYTES
    name = f"{PREFIX}_{size}"
    started = time.perf_counter()
    create_database(name)
    HASH_IS_BYTES = (
        sql(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'audit_auditevent' AND column_name = 'hash'"
        )[0][0]
        == "bytea"
    )
    templates = real_runs()
    ids = {**templates, **replicate(templates, size)}
    built = time.perf_counter() - started
    print(f"{size} tasks: built in {built:.0f} s", file=sys.stderr)
    result: dict[str, Any] = {"build_seconds": round(built), **storage()}
    result["ops"] = measure(ids, repeat)
    connections.close_all()
    if keep:
        drop_database(keep)
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" RENAME TO "{keep}"')
    else:
        drop_database(name)
    return result


def measure_kept(name: str, repeat: int) -> tuple[int, dict[str, Any]]:
    """Measure database ``name`` as built (kept by ``--keep``), after migrating it to this
    code. Returns its size (ordinary tasks) and its figures."""
    use_database(name)
    call_command("migrate", verbosity=0)
    size = sql("SELECT count(*) FROM agents_agenttask")[0][0] - 4  # 3 real runs, big trail
    ids = {
        "big": AgentTask.objects.get(audit_seq=BIG_TRAIL).pk,
        "llm": AgentTask.objects.filter(agent_name="llm").order_by("created_at")[0].pk,
    }
    result: dict[str, Any] = {"database": name, **storage(), "ops": measure(ids, repeat)}
    connections.close_all()
    return size, result


HASH_IS_BYTES = False


def main() -> None:
    args = ARGS
    assert args is not None
    sizes = args.sizes
    setup_test_environment()  # lets the test client's "testserver" host in
    results: dict[str, Any] = {"machine": machine(), "sizes": {}}
    if args.measure:
        size, figures = measure_kept(args.measure, args.repeat)
        results["sizes"][str(size)] = figures
        sizes = [size]
    else:
        for size in sizes:
            keep = args.keep if size == sizes[-1] else None
            results["sizes"][str(size)] = one_size(size, args.repeat, keep)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    names = list(results["sizes"][str(sizes[0])]["ops"])
    print("| operation | " + " | ".join(f"{s:,}" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for op in names:
        print(
            f"| {op} | "
            + " | ".join(f"{results['sizes'][str(s)]['ops'][op]:,} ms" for s in sizes)
            + " |"
        )
    print(
        "| bytes per finished task | "
        + " | ".join(f"{results['sizes'][str(s)]['bytes_per_task']:,}" for s in sizes)
        + " |"
    )


if __name__ == "__main__":
    main()
