"""Limits and outages on real workers (issue 9, cases 5, 6, 7, 8, 11 and 12).

Each test runs real Celery worker processes on RabbitMQ and PostgreSQL (a private
PostgreSQL where the database must stop, private queues where the broker's own limits
matter), and counts what happened: rows, audit events, copies of a step started (the
``recorded`` agent logs each copy's start and end to ``AGENTS_COPY_LOG``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from agents.core import clock
from agents.models import AgentTask, Checkpoint, Suspension, TaskStatus
from agents.services import task_start
from agents_project.topology import dead_letter_queue
from audit.models import AuditEvent, DeadLetter
from tests.helpers import private_queues, queue_depth, wait_until, worker_env
from tests.integration import scenario
from tests.integration.servers import private_postgres

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
# Celery logs "ready." at INFO: the tests wait for it before they create work.
RECORDED = {"AGENTS_MODULES": "tests.integration.agents_for_tests", "CELERY_LOG_LEVEL": "INFO"}


@pytest.fixture
def recorded():
    """The ``recorded`` agent, registered in this process too (tasks are created here)."""
    from tests.integration import agents_for_tests  # noqa: F401


@pytest.fixture
def copy_log(tmp_path) -> Path:
    return tmp_path / "copies.log"


def copies(path: Path) -> list[tuple[str, str, int, int, float]]:
    """``(event, task id, step, pid, time)`` for every line of a copy log."""
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(e, t, int(s), int(p), float(w)) for e, t, s, p, w in lines]


def starts(path: Path, task_id, step: int) -> list[int]:
    """The pids of the copies of ``step`` of the task that started."""
    return [p for e, t, s, p, _ in copies(path) if e == "start" and t == str(task_id) and s == step]


def ends(path: Path, task_id, step: int) -> list[int]:
    return [p for e, t, s, p, _ in copies(path) if e == "end" and t == str(task_id) and s == step]


def status(task_id) -> str:
    return AgentTask.objects.get(pk=task_id).status


def ready(workers, index: int) -> bool:
    path = workers.logs[index][0]
    return path.exists() and b"ready." in path.read_bytes()


def events(task_id, kind: str) -> int:
    return AuditEvent.objects.filter(task_id=task_id, type=kind).count()


# --- 5. Deadline overrun --------------------------------------------------------------


def test_a_step_queued_past_its_deadline_never_runs(workers, user, recorded, copy_log):
    # One pool process, busy with a long step; the second task's only step waits behind
    # it in the queue while its deadline passes.
    workers.start(concurrency=1, AGENTS_COPY_LOG=str(copy_log), **RECORDED)
    wait_until(lambda: ready(workers, 0), timeout=60)
    blocker, _ = task_start(owner=user, agent="recorded", input={"script": [{"sleep": 5}]})
    wait_until(lambda: starts(copy_log, blocker.pk, 1), timeout=30)
    late, _ = task_start(
        owner=user,
        agent="recorded",
        input={"script": [{"tool": "ledger.append", "args": {"key": "late", "value": 1}}]},
        timeout_seconds=1,
    )
    wait_until(lambda: status(blocker.pk) == TaskStatus.COMPLETED, timeout=60)
    # The late step's message reaches the pool process after the blocker: wait until the
    # worker has dealt with it (a third task, queued behind it, has run).
    after, _ = task_start(owner=user, agent="recorded", input={"script": [{"final": 1}]})
    wait_until(lambda: status(after.pk) == TaskStatus.COMPLETED, timeout=60)
    assert status(late.pk) == TaskStatus.TIMED_OUT
    assert late.ledger.count() == 0
    assert starts(copy_log, late.pk, 1) == [], "the agent's code ran after the deadline"
    assert not Checkpoint.objects.filter(task=late, step__gte=1).exists()


def test_a_step_running_past_its_deadline_is_stopped_at_the_deadline(
    workers, user, recorded, copy_log
):
    workers.start(concurrency=1, AGENTS_COPY_LOG=str(copy_log), **RECORDED)
    wait_until(lambda: ready(workers, 0), timeout=60)
    task, _ = task_start(
        owner=user,
        agent="recorded",
        input={
            "script": [
                {"sleep": 60},
                {"tool": "ledger.append", "args": {"key": "after", "value": 1}},
                {"final": "never"},
            ]
        },
        timeout_seconds=4,
    )
    wait_until(lambda: starts(copy_log, task.pk, 1), timeout=30)
    # The step sleeps 60 s; it ends (the copy log's "end" line) only because it is
    # stopped at the deadline, well before.
    wait_until(lambda: ends(copy_log, task.pk, 1), timeout=30)
    wait_until(lambda: status(task.pk) == TaskStatus.TIMED_OUT, timeout=30)
    # The pool process is free again: a new task's step runs to completion on it.
    other, _ = task_start(owner=user, agent="recorded", input={"script": [{"final": 1}]})
    wait_until(lambda: status(other.pk) == TaskStatus.COMPLETED, timeout=30)
    assert starts(copy_log, task.pk, 1) == ends(copy_log, task.pk, 1)
    assert len(starts(copy_log, task.pk, 1)) == 1
    assert starts(copy_log, task.pk, 2) == []
    assert not Checkpoint.objects.filter(task=task, step__gte=1).exists()
    assert task.ledger.count() == 0
    assert events(task.pk, "step") == 0
    assert "deadline" in AgentTask.objects.get(pk=task.pk).error


# --- 6. Graceful deploys --------------------------------------------------------------


def test_three_graceful_deploys_during_one_healthy_step(workers, user, recorded, copy_log):
    env = {"AGENTS_COPY_LOG": str(copy_log), "AGENTS_SHUTDOWN_GRACE": "2", **RECORDED}
    workers.start(concurrency=1, **env)
    wait_until(lambda: ready(workers, 0), timeout=60)
    # Long enough that each deploy (a worker start, slow on a loaded machine, then the
    # 2 s grace) ends the running copy before it finishes.
    task, _ = task_start(
        owner=user, agent="recorded", input={"script": [{"sleep": 20}, {"final": "ok"}]}
    )
    wait_until(lambda: len(starts(copy_log, task.pk, 1)) == 1, timeout=60)

    def started(copies: int) -> bool:
        return len(starts(copy_log, task.pk, 1)) == copies

    for deploy in range(1, 4):
        # A deploy: the new worker is ready, then the one running the step gets SIGTERM.
        workers.start(concurrency=1, **env)
        wait_until(partial(ready, workers, deploy), timeout=60)
        workers.processes[deploy - 1].send_signal(signal.SIGTERM)
        workers.processes[deploy - 1].wait(timeout=60)
        wait_until(partial(started, deploy + 1), timeout=60)
    wait_until(lambda: status(task.pk) == TaskStatus.COMPLETED, timeout=60)
    pids = starts(copy_log, task.pk, 1)
    assert len(pids) == 4 and len(set(pids)) == 4, pids
    assert events(task.pk, "worker_lost") == 0
    assert not DeadLetter.objects.filter(task=task).exists()
    assert events(task.pk, "step") == 2
    final = AgentTask.objects.get(pk=task.pk)
    assert final.worker_losses == 0
    # The committed copy ran on the last worker.
    assert pids[-1] in ends(copy_log, task.pk, 1)


# --- 7. A fast clock ------------------------------------------------------------------


# libfaketime 0.9.10 (Debian 12) breaks Python 3.11's time.sleep when the monotonic
# clock is not faked (libfaketime issue #426: clock_nanosleep with TIMER_ABSTIME gets
# EINVAL); faking the monotonic clock instead stalls every timed wait of a thread. So the
# worker fakes only the wall clock and sleeps with a relative timeout.
_SLEEP_SHIM = """
import select, time


def _sleep(seconds):
    if seconds > 0:
        select.select([], [], [], seconds)


time.sleep = _sleep
"""


def test_a_worker_whose_clock_is_120_s_fast_keeps_time_by_the_database(
    workers, user, recorded, copy_log, tmp_path
):
    assert FAKETIME.exists(), "libfaketime is missing: apt-get install faketime"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SLEEP_SHIM)
    workers.start(
        concurrency=1,
        AGENTS_COPY_LOG=str(copy_log),
        AGENTS_RETRY_BACKOFF="3",
        AGENTS_RETRY_BACKOFF_MAX="3",
        LD_PRELOAD=str(FAKETIME),
        FAKETIME="+120s",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])),
        **RECORDED,
    )
    task, _ = task_start(
        owner=user,
        agent="recorded",
        input={
            "script": [
                {"sleep": 1},
                {"wait": 3},
                {"fail": "flaky upstream", "times": 1},
                {"final": "on time"},
            ]
        },
        timeout_seconds=60,
    )
    # The worker's clock is 120 s fast: had it used its own clock, the 60 s deadline
    # would have passed at once. The test process's clock is the database's.
    wait_until(lambda: starts(copy_log, task.pk, 1), timeout=30)
    assert max(w for *_, w in copies(copy_log)) > clock.now().timestamp() + 100, (
        "the worker's clock is not fast: is libfaketime working?"
    )

    suspension = wait_until(lambda: Suspension.objects.filter(task=task).first(), timeout=30)
    seen_suspended = clock.now()
    # The timer is 3 s on the database's clock (not 123 s, nor already due).
    assert suspension.wake_at > seen_suspended
    assert (suspension.wake_at - seen_suspended).total_seconds() <= 4
    wait_until(
        lambda: Suspension.objects.filter(pk=suspension.pk, resolved_at__isnull=False).exists(),
        timeout=30,
    )
    woke_seen = clock.now()
    assert woke_seen >= suspension.wake_at, "the timer fired before its time"

    retry_at = wait_until(
        lambda: AgentTask.objects.filter(pk=task.pk).values_list("retry_at", flat=True).first(),
        timeout=30,
        interval=0.02,
    )
    seen_retrying = clock.now()
    # Backoff 3 s with jitter: due in 1.5 to 3 s on the database's clock.
    assert 0 < (retry_at - seen_retrying).total_seconds() <= 3.5
    wait_until(lambda: len(starts(copy_log, task.pk, 3)) == 2, timeout=30, interval=0.02)
    assert clock.now() >= retry_at, "the retry ran before its time"
    wait_until(lambda: status(task.pk) == TaskStatus.COMPLETED, timeout=30)
    final = AgentTask.objects.get(pk=task.pk)
    assert final.result == "on time"
    assert events(task.pk, "step_failed") == 1
    assert len(starts(copy_log, task.pk, 3)) == 2, "the failed attempt, then its retry"


# --- 8. A database outage longer than the worker's patience ---------------------------


def test_a_database_outage_longer_than_patience_gives_the_message_back(workers):
    with private_postgres() as pg, private_queues("dbout") as names:
        env = worker_env(**names, DATABASE_URL=pg.url, AGENTS_DATABASE_PATIENCE="2")
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            timeout=120,
        )
        workers.start(concurrency=2, **env)
        # Steps that sleep 4 s: some are running when the database goes away.
        ids = scenario.run(env, "create", "6", "4").split()

        def count(sql: str) -> int:
            try:
                url = pg.url.replace("postgres://", "postgresql://")
                with psycopg.connect(url, connect_timeout=2) as db:
                    row = db.execute(sql).fetchone()
                    assert row is not None
                    return row[0]
            except psycopg.OperationalError:
                return -1

        wait_until(lambda: count("select count(*) from agents_checkpoint where step > 0") >= 6)
        log = workers.logs[0][0]
        given_back = b"message given back"
        before = log.read_bytes().count(given_back)
        pg.stop()
        # Down for longer than the patience: a step gives its message back.
        wait_until(lambda: log.read_bytes().count(given_back) > before, timeout=60)
        pg.start()
        wait_until(
            lambda: count("select count(*) from agents_agenttask where status = 'completed'") == 6,
            timeout=120,
        )
        problems = json.loads(scenario.run(env, "check", *ids))
        # Rescued by the given-back message, not by the stuck-task sweep.
        republished = count("select count(*) from audit_auditevent where type = 'republished'")
        dead = count("select count(*) from audit_deadletter")
        # A message given back in an outage is not a death: its lease is released when
        # the database answers again, so the redelivery takes it over uncounted.
        lost = count("select count(*) from audit_auditevent where type = 'worker_lost'")
        workers.stop_all()
    assert problems == []
    assert republished == 0
    assert dead == 0
    assert lost == 0


# --- 11. Memory ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_pool_process_stays_bounded_over_many_large_inputs(workers, user):
    # ~240 KB of JSON that decodes into ~1.2 MB of Python objects, per task.
    pad = list(range(100_000, 130_000))
    # The default cache (32 MiB): issue 22 found it held decoded inputs, 3.8 MB per task.
    worker = workers.start(concurrency=1, CELERY_LOG_LEVEL="INFO")
    wait_until(lambda: ready(workers, 0), timeout=60)
    [child] = _children(worker.pid)

    def run(n: int) -> None:
        ids = [
            task_start(
                owner=user,
                agent="scripted",
                input={"script": [{"think": "a"}, {"final": i}], "pad": pad},
            )[0].pk
            for i in range(n)
        ]
        wait_until(
            lambda: AgentTask.objects.filter(pk__in=ids, status="completed").count() == n,
            timeout=300,
        )

    assert len(json.dumps({"pad": pad})) > 230_000
    run(10)  # warm up: imports, connections, the first inputs
    warm = _rss_kb(child)
    run(120)
    assert _children(worker.pid) == [child], "the pool process was replaced"
    grown_mb = (_rss_kb(child) - warm) / 1024
    print(f"pool process RSS: {warm / 1024:.0f} MB warm, grew {grown_mb:.1f} MB over 120 tasks")
    # Bounded by text length, 120 inputs took ~450 MB; now at most its 32 MiB.
    assert grown_mb < 32 + 40


# --- 12. RabbitMQ's own delivery limit -----------------------------------------------


def test_rabbitmqs_delivery_limit_becomes_a_dead_letter_row_and_requeues(workers):
    with private_queues("dlimit") as names:
        # Every process declaring the queue must give it the same delivery limit.
        env = worker_env(**names, AGENTS_DELIVERY_LIMIT="2")
        dlq = dead_letter_queue(
            {
                "DEAD_LETTER_EXCHANGE": names["AGENTS_DEAD_LETTER_EXCHANGE"],
                "DEAD_LETTER_QUEUE": names["AGENTS_DEAD_LETTER_QUEUE"],
            }
        )
        workers.start(
            concurrency=1,
            **env,
            AGENTS_MAX_WORKER_LOSSES="50",
            AGENTS_ENVIRONMENT="test",
            AGENTS_FAULT_INJECTION="before_commit@2",
            AGENTS_DLQ_RECONCILE_INTERVAL="1",
        )
        [task_id] = scenario.run(env, "create", "1").split()
        wait_until(lambda: status(task_id) == TaskStatus.DEAD_LETTERED, timeout=120)
        letter = DeadLetter.objects.get(task_id=UUID(task_id))
        assert letter.reason == DeadLetter.Reason.DELIVERY_LIMIT
        assert letter.step == 2
        # The worker's own count never reached its limit: RabbitMQ's did.
        losses = events(task_id, "worker_lost")
        assert 1 <= losses < 50
        assert events(task_id, "dead_lettered") == 1
        # The reconciler recorded the row; the DLQ holds the open letter's message once.
        wait_until(lambda: queue_depth(dlq) == 1, timeout=30)

        # A fixed deploy, then the operator requeues: the letter's message leaves the DLQ.
        workers.stop_all()
        workers.start(concurrency=1, **env)
        subprocess.run(
            [sys.executable, "manage.py", "requeue_dead_letters", "--task", task_id],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            timeout=120,
        )
        wait_until(lambda: scenario.finished([task_id]), timeout=60)
        assert scenario.check([task_id]) == []
        assert DeadLetter.objects.get(pk=letter.pk).requeued_at is not None
        assert queue_depth(dlq) == 0
