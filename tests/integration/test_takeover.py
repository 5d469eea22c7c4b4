"""Steps whose holder vanished move on by themselves (issue 22): a worker on another
"machine" cut off mid-step, a queue purged after kill -9, a commit PostgreSQL
acknowledged and then lost. Real workers, PostgreSQL and RabbitMQ; nothing here asserts
a time (``benchmarks/takeover.py`` measures it), only what happened.

The takeover is the scheduler's (``agents.core.scheduler.vanished_tasks_republish``),
run here with the default lease (6 s) and grace (10 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from agents.models import AgentTask, Checkpoint, TaskStatus
from agents.services import service_user, task_start
from audit.models import AuditEvent
from tests.helpers import private_queues, purge_queues, queue_depth, wait_until, worker_env
from tests.integration import agents_for_tests, scenario
from tests.integration.netns import network_host
from tests.integration.servers import private_postgres
from tools.models import LedgerEntry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"AGENTS_MODULES": agents_for_tests.__name__}


def ready(workers, index: int) -> bool:
    path = workers.logs[index][0]
    return path.exists() and b"ready." in path.read_bytes()


def takeovers(task_id) -> list[AuditEvent]:
    return [
        e
        for e in AuditEvent.objects.filter(task_id=task_id, type="republished")
        if "vanished" in e.payload["reason"]
    ]


def copies(log: Path) -> list[tuple[str, str]]:
    """(start|end, host) of each copy of step 1 of ``slow_side_effect``."""
    if not log.exists():
        return []
    return [(f[0], f[5]) for f in (line.split() for line in log.read_text().splitlines())]


def test_a_worker_cut_off_mid_step_is_taken_over_and_its_late_commit_refused(workers, tmp_path):
    """A worker in its own network namespace (another host name) runs a step that
    sleeps, then appends to the ledger; its link is cut mid-sleep. A worker on this
    host takes the step over once its lease is past the grace; when the link is back
    the cut-off copy finishes, its side effect finds the ledger row already there and
    its commit is refused by the fence."""
    log = tmp_path / "copies.log"
    env = {**MODULES, "AGENTS_COPY_LOG": str(log), "CELERY_LOG_LEVEL": "INFO"}
    index = 1 + os.getpid() % 240
    with network_host(f"agt{os.getpid() % 100000}", index) as far:
        workers.start(concurrency=1, prefix=far.prefix("far-host"), **far.env(worker_env(**env)))
        wait_until(lambda: ready(workers, 0), timeout=90)
        task = task_start(
            owner=service_user("takeover"), agent="slow_side_effect", input={"sleep": 8}
        )[0]
        wait_until(lambda: ("start", "far-host") in copies(log), timeout=30)
        workers.start(concurrency=1, **env)
        wait_until(lambda: ready(workers, 1), timeout=90)
        far.cut()
        try:
            wait_until(
                lambda: AgentTask.objects.get(pk=task.pk).status == TaskStatus.COMPLETED,
                timeout=120,
            )
        finally:
            far.restore()
        # The cut-off copy comes back: it ends its sleep, runs its tool, is fenced out.
        far_log = workers.logs[0][0]
        wait_until(lambda: b"lease lost before the commit" in far_log.read_bytes(), timeout=90)
    task.refresh_from_db()
    assert task.result == "done"
    hosts = [host for kind, host in copies(log) if kind == "start"]
    assert hosts[0] == "far-host" and len(hosts) == 2 and hosts[1] != "far-host", hosts
    assert LedgerEntry.objects.filter(task=task).count() == 1, "one side effect per key"
    steps = list(Checkpoint.objects.filter(task=task).values_list("step", flat=True))
    assert sorted(steps) == [0, 1, 2]
    assert len(takeovers(task.pk)) == 1
    assert AuditEvent.objects.filter(task=task, type="worker_lost").count() == 1


def test_a_step_whose_message_was_purged_after_kill_9_runs_again(workers):
    """The only worker is killed with kill -9 mid-step and the work queue is then
    purged (as a broker restored from an old disk would): nothing holds a message of
    the step, and the next worker's sweep publishes it again."""
    workers.start(concurrency=1)
    [task_id] = scenario.create(1, script=_with_sleep(4))
    wait_until(lambda: _held_at(task_id, 3), timeout=60)
    workers.kill(0)
    wait_until(lambda: queue_depth() == 1, timeout=30)  # RabbitMQ got it back
    purge_queues()
    assert queue_depth() == 0
    workers.start(concurrency=1)
    wait_until(lambda: scenario.finished([task_id]), timeout=120)
    assert scenario.check([task_id], script=_with_sleep(4)) == []
    assert len(takeovers(task_id)) == 1


def _with_sleep(seconds: float) -> list[dict]:
    return [{"sleep": seconds} if "sleep" in e else e for e in scenario.SCRIPT]


def _held_at(task_id: str, step: int) -> bool:
    row = AgentTask.objects.values("current_step", "lease_owner").get(pk=task_id)
    return row["current_step"] == step and row["lease_owner"] != ""


def test_a_commit_postgresql_acknowledged_then_lost_is_done_again(workers):
    """A private PostgreSQL with ``synchronous_commit = off`` acknowledges commits
    before they are on disk. Its WAL writer is frozen once step 3 runs, the task goes
    on to completion, and the server is killed: after the restart the task is back at
    step 3 with an expired lease and nothing in the queue. The sweep runs it again;
    every checkpoint and side effect ends up once."""
    with private_postgres() as pg, private_queues("lostcommit") as names:
        env = worker_env(**names, DATABASE_URL=pg.url)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            timeout=180,
        )
        url = pg.url.replace("postgres://", "postgresql://")
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("ALTER SYSTEM SET synchronous_commit = off")
            db.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            db.execute("SELECT pg_reload_conf()")

        def row(task_id: str) -> tuple | None:
            try:
                with psycopg.connect(url, connect_timeout=2) as db:
                    return db.execute(
                        "SELECT status, current_step, lease_owner <> '' FROM agents_agenttask"
                        " WHERE id = %s",
                        [task_id],
                    ).fetchone()
            except psycopg.OperationalError:
                return None

        workers.start(concurrency=2, **env)
        [task_id] = scenario.run(env, "create", "1", "4").split()
        wait_until(lambda: row(task_id) == ("running", 3, True), timeout=60)
        with psycopg.connect(url, autocommit=True) as db:
            # Everything so far reaches the disk (a synchronous commit flushes the WAL
            # before it), then nothing more: the WAL writer stops.
            db.execute("SET synchronous_commit = on")
            db.execute("CREATE TABLE flushed (at timestamptz)")
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            children = _children(postmaster)
            walwriter = [pid for pid, title in children if "walwriter" in title]
            assert walwriter, children
            os.kill(walwriter[0], signal.SIGSTOP)
        wait_until(lambda: (row(task_id) or ("",))[0] == "completed", timeout=60)
        # The crash: the server and every process of it at once.
        os.kill(postmaster, signal.SIGSTOP)
        for pid, _ in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.kill(postmaster, signal.SIGKILL)
        wait_until(lambda: not _alive(postmaster), timeout=30)
        pg.start()
        after = row(task_id)
        assert after is not None and after[:2] == ("running", 3), (
            f"the acknowledged commits were not lost: {after}"
        )
        wait_until(lambda: (row(task_id) or ("",))[0] == "completed", timeout=120)
        problems = scenario.run(env, "check", task_id)
        with psycopg.connect(url) as db:
            reasons = [
                r[0]
                for r in db.execute(
                    "SELECT payload->>'reason' FROM audit_auditevent"
                    " WHERE task_id = %s AND type = 'republished'",
                    [task_id],
                )
            ]
        workers.stop_all()
    assert problems.strip() == "[]", problems
    assert any("vanished" in r for r in reasons), reasons


def _children(pid: int) -> list[tuple[int, str]]:
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [(int(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in out.splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cleanup_leaves_no_namespace_behind():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with network_host(f"agc{os.getpid() % 100000}", 1 + (os.getpid() + 7) % 240) as host:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert host.name in listed
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert host.name not in after and after == before
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert host.host_link not in links
