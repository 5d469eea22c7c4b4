"""How fast ``audit_verify`` streams and checks one long audit trail, from the database
and from the task's archive.

    python benchmarks/audit_verify.py [--events 100000] [--repeat 3] [--database NAME]

Needs PostgreSQL (``DATABASE_URL``'s server; the benchmark creates and drops its own
database, ``--database``, by default ``agents_bench_verify``). It builds one task with
``--events`` audit events, numbered, time-stamped and chained by the project's own sealing code
(``audit.services.AuditBatch``, in batches of 5,000), then times:

  database  ``manage.py audit_verify TASK_ID``: the events streamed through a
            server-side cursor and every hash recomputed;
  archive   ``manage.py audit_verify --archive FILE``: the same chain read from the
            task's archive (``agents.retention`` writes it; gzip-compressed JSON lines).

and prints the median of ``--repeat`` runs: wall-clock seconds and events per second,
and the verifier's CPU seconds (its process and its worker processes: a trail this long
is verified in ranges by one process per CPU) and events per CPU-second (the figure that
does not depend on what else the machine runs), with the load average.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import django_on, fresh_database  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database", default="agents_bench_verify")
    return parser.parse_args()


ARGS = arguments() if __name__ == "__main__" else None
django_on(ARGS.database if ARGS else "agents_bench_verify")

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.files.storage import FileSystemStorage  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from agents.models import AgentTask  # noqa: E402
from agents.retention import task_archive_write  # noqa: E402
from audit.models import AuditEvent, EventType  # noqa: E402
from audit.services import AuditBatch  # noqa: E402


def task_with_events(events: int) -> AgentTask:
    owner = get_user_model().objects.create_user("bench")
    task = AgentTask.objects.create(
        owner=owner, agent_name="scripted", agent_version="1.0", input={}, state_version=1
    )
    for start in range(0, events, 5000):
        with transaction.atomic():
            locked = AgentTask.objects.select_for_update().get(pk=task.pk)
            batch = AuditBatch(locked, actor="worker:bench:1")
            for n in range(start, min(start + 5000, events)):
                batch.add(
                    EventType.TOOL_RESULT,
                    {"tool": "calc", "result": n * 1.5, "ok": True, "note": f"row {n}"},
                    step=n // 3 + 1,
                )
            batch.flush()
            locked.save(update_fields=["audit_seq"])
    task.refresh_from_db()
    return task


def cpu_seconds() -> float:
    """CPU seconds of this process and of its ended children (the verifier's worker
    processes; PostgreSQL's own work is in its processes)."""
    own, children = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.user + own.system + children.ru_utime + children.ru_stime


def timed(run, repeat: int) -> tuple[float, float]:
    """Median wall-clock seconds and median CPU seconds (``cpu_seconds``) over
    ``repeat`` runs."""
    run()  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        started, cpu = time.perf_counter(), cpu_seconds()
        run()
        walls.append(time.perf_counter() - started)
        cpus.append(cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    args = ARGS
    assert args is not None
    fresh_database()
    task = task_with_events(args.events)
    assert AuditEvent.objects.filter(task=task).count() == args.events

    def from_database() -> None:
        call_command("audit_verify", str(task.pk), stdout=io.StringIO(), stderr=io.StringIO())

    with tempfile.TemporaryDirectory() as folder:
        storage = FileSystemStorage(location=folder)
        archive = task_archive_write(task_id=task.pk, storage=storage)
        path = storage.path(archive.name)

        def from_archive() -> None:
            call_command("audit_verify", "--archive", path, stdout=io.StringIO())

        results = {"database": timed(from_database, args.repeat)}
        results["archive"] = timed(from_archive, args.repeat)
        size = os.path.getsize(path)
    print(f"audit_verify of one task with {args.events:,} events (median of {args.repeat}):")
    for name, (wall, cpu) in results.items():
        print(
            f"  {name:9} {wall:6.2f} s wall {args.events / wall:10,.0f} events/s;  "
            f"{cpu:6.2f} s CPU {args.events / cpu:10,.0f} events per CPU-second"
        )
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  archive file: {size:,} bytes ({size / args.events:.0f} B per event, gzip)")
    connection.close()


if __name__ == "__main__":
    main()
