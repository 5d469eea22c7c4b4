"""At most one live copy of a step, and no step that loops or waits forever.

Each test is one of the cases an adversary found (issue 9), on real worker processes,
PostgreSQL and RabbitMQ. The ``recorded`` agent logs when every copy of every step
starts and ends, so "no two copies at once" is checked on evidence, not assumed.
"""

from __future__ import annotations

import os
import signal
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import transaction

from agents.models import AgentTask, TaskStatus
from agents.services import service_user, task_start
from audit.models import AuditEvent
from tests.helpers import publishes_refused, queue_depth, run_until_idle
from tests.helpers import wait_until as _wait_until
from tests.integration import agents_for_tests, copies, scenario

pytestmark = pytest.mark.integration

TEST_AGENTS = agents_for_tests.__name__


def wait_until(predicate, timeout=60.0):
    return _wait_until(predicate, timeout=timeout, interval=0.1)


@pytest.fixture
def copy_log(tmp_path):
    return tmp_path / "copies.log"


def env(copy_log, **extra):
    return {"AGENTS_MODULES": TEST_AGENTS, "AGENTS_COPY_LOG": str(copy_log), **extra}


def start(script, **kwargs):
    owner = service_user("copies")
    return task_start(owner=owner, agent="recorded", input={"script": script}, **kwargs)[0]


def status(task):
    return AgentTask.objects.values_list("status", flat=True).get(pk=task.pk)


def events(task, kind):
    return list(AuditEvent.objects.filter(task=task, type=kind).order_by("seq"))


def test_a_step_that_waited_in_the_queue_then_ran_long_is_never_copied(workers, copy_log):
    """Case 1: queue wait plus run time no longer makes anything publish a copy."""
    workers.start(concurrency=1, **env(copy_log))
    tasks = [start([{"sleep": 1.5}, {"final": i}]) for i in range(3)]
    wait_until(lambda: all(status(t) == TaskStatus.COMPLETED for t in tasks))
    assert copies.overlaps(copy_log) == []
    assert set(copies.starts(copy_log).values()) == {1}, "each step ran exactly once"
    assert not AuditEvent.objects.filter(type="republished").exists()


def test_a_retry_timer_never_runs_a_step_twice_or_spends_two_attempts(workers, copy_log):
    """Case 1: the retry timer and the sweep no longer both publish the same step."""
    workers.start(concurrency=2, **env(copy_log, AGENTS_RETRY_BACKOFF="1"))
    task = start([{"fail": "not yet", "times": 2}, {"final": "ok"}])
    wait_until(lambda: status(task) == TaskStatus.COMPLETED)
    assert [e.payload["attempt"] for e in events(task, "step_failed")] == [1, 2]
    assert copies.starts(copy_log)[(str(task.pk), 1)] == 3
    assert copies.overlaps(copy_log) == []


def test_a_crash_after_publishing_the_next_step_never_runs_it_twice(workers, copy_log, tmp_path):
    """Case 1: the worker dies after publishing step 2, before step 1's commit; the
    redelivered step 1 and the published step 2 never both run step 2."""
    once = tmp_path / "fault-once"
    workers.start(
        concurrency=2,
        **env(
            copy_log,
            AGENTS_FAULT_INJECTION="after_publish@1",
            AGENTS_FAULT_ONCE_FILE=str(once),
        ),
    )
    task = start(
        [{"think": "a"}, {"sleep": 3}, {"tool": "ledger.append", "args": {"key": "k", "value": 1}}]
    )
    wait_until(lambda: status(task) == TaskStatus.COMPLETED)
    assert once.exists(), "the fault fired"
    assert copies.overlaps(copy_log) == []
    assert copies.starts(copy_log)[(str(task.pk), 2)] == 1
    assert scenario.check([str(task.pk)], script=[{}, {}, {"tool": "ledger.append"}, {}]) == []


def test_a_broker_connection_drop_mid_step_runs_no_second_copy(workers, copy_log):
    """Case 1: RabbitMQ redelivers the step of a worker whose connection dropped; the
    other worker sees the first copy alive and drops its copy. No worker died, so no
    worker loss is recorded."""
    proxy = copies.Proxy(("127.0.0.1", 5672))
    try:
        broker = os.environ["CELERY_BROKER_URL"].replace(":5672", f":{proxy.port}")
        workers.start(concurrency=1, **env(copy_log, CELERY_BROKER_URL=broker))
        task = start([{"sleep": 4}, {"final": "ok"}])
        wait_until(lambda: copies.starts(copy_log).get((str(task.pk), 1)) == 1)
        workers.start(concurrency=1, **env(copy_log))
        time.sleep(0.5)
        assert proxy.cut() >= 1, "the first worker's broker connection was cut"
        wait_until(lambda: status(task) == TaskStatus.COMPLETED)
    finally:
        proxy.close()
    assert copies.overlaps(copy_log) == []
    assert copies.starts(copy_log)[(str(task.pk), 1)] == 1
    assert events(task, "worker_lost") == []


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("nan", "state.items[3]"),
        ("set", "state.items[3]"),
        ("nul", "result.text"),
        ("tool_nul", "tool_results[0].value.body"),
    ],
)
def test_a_value_postgresql_refuses_fails_the_task_once_naming_where(workers, kind, where):
    """Case 2: caught before the commit as a permanent error naming its path; the task
    ends, nothing loops."""
    workers.start(concurrency=1, AGENTS_MODULES=TEST_AGENTS)
    owner = service_user("copies")
    task, _ = task_start(owner=owner, agent="poison", input={"kind": kind})
    wait_until(lambda: status(task) == TaskStatus.FAILED)
    task.refresh_from_db()
    assert where in task.error
    failures = events(task, "step_failed")
    assert len(failures) == 1 and failures[0].payload["permanent"] is True
    time.sleep(1.0)
    assert len(events(task, "step_failed")) == 1, "never retried, never re-run"
    assert not AuditEvent.objects.filter(task=task, type="republished").exists()


def test_rows_the_sweep_cannot_act_on_never_starve_the_rest(workers, copy_log):
    """Case 3: 200 running tasks of an agent no worker knows; an ordinary task whose
    publish was refused is still swept at once, and resume_stuck sees only it."""
    owner = service_user("copies")
    AgentTask.objects.bulk_create(
        AgentTask(
            owner=owner,
            agent_name="removed-in-a-deploy",
            agent_version="1",
            input={},
            state_version=1,
            status=TaskStatus.RUNNING,
        )
        for _ in range(200)
    )
    task = start([{"think": "a"}, {"final": "ok"}])
    with publishes_refused():
        run_until_idle(max_messages=1)
    listing = StringIO()
    call_command("resume_stuck", "--dry-run", stdout=listing)
    assert str(task.pk) in listing.getvalue()
    assert "removed-in-a-deploy" not in listing.getvalue()
    workers.start(concurrency=1, **env(copy_log))
    wait_until(lambda: status(task) == TaskStatus.COMPLETED, timeout=20)


def test_a_backlog_is_never_copied_by_the_sweep(workers, copy_log):
    """Case 4: one slow worker and a backlog that waits far longer than any step: the
    sweep adds nothing, the queue never holds more than one message per task, and new
    tasks are still accepted."""
    tasks = [start([{"sleep": 0.3}, {"final": i}]) for i in range(40)]
    workers.start(concurrency=1, **env(copy_log))
    depths = []
    for _ in range(30):
        depths.append(queue_depth())
        time.sleep(0.2)
    late = start([{"final": "late"}])
    wait_until(lambda: status(late) == TaskStatus.COMPLETED, timeout=120)
    wait_until(lambda: all(status(t) == TaskStatus.COMPLETED for t in tasks), timeout=60)
    assert max(depths) <= 40, f"queue depth {max(depths)}: copies were added"
    assert not AuditEvent.objects.filter(type="republished").exists()
    assert copies.overlaps(copy_log) == []


def test_a_slow_commit_of_a_new_task_never_makes_a_worker_drop_step_one(workers, copy_log):
    """Case 9: step 1 is published before the creating transaction commits; a worker
    that gets there first waits for the commit instead of dropping the step."""
    workers.start(concurrency=1, **env(copy_log))
    time.sleep(2)  # the worker is consuming
    with transaction.atomic():
        task = start([{"final": "ok"}])
        time.sleep(3)
    wait_until(lambda: status(task) == TaskStatus.COMPLETED, timeout=10)
    assert not AuditEvent.objects.filter(task=task, type="republished").exists()
    assert copies.starts(copy_log)[(str(task.pk), 1)] == 1


def test_a_refused_step_is_refused_once_and_not_republished_in_a_loop(workers, copy_log):
    """Case 10: a checkpoint newer than the worker's code is refused once, parked, and
    not offered again to a worker that would refuse it again."""
    task = start([{"think": "a"}, {"final": "ok"}])
    from agents.models import Checkpoint

    Checkpoint.objects.filter(task=task, step=0).update(schema_version=2)
    workers.start(concurrency=1, **env(copy_log, AGENTS_SCHEDULER_INTERVAL="0.1"))
    wait_until(lambda: events(task, "schema_refused"))
    time.sleep(3)  # thirty sweeps
    assert len(events(task, "schema_refused")) == 1
    assert events(task, "republished") == []
    task.refresh_from_db()
    assert (task.status, task.current_step, task.needs_state_version) == ("pending", 1, 2)


def test_fifty_long_steps_on_three_workers_under_kills_drops_and_deploys(workers, copy_log):
    """The soak: 50 tasks with 1.5 s steps on three workers while workers are killed
    with SIGKILL, a broker connection is cut and a worker is restarted gracefully. No
    step's code ever runs in two live processes at once; nothing is lost or stuck."""
    script = [
        {"sleep": 1.5},
        {"tool": "ledger.append", "args": {"key": "a", "value": 1}},
        {"sleep": 1.0},
        {"final": "done"},
    ]
    proxy = copies.Proxy(("127.0.0.1", 5672))
    broker = os.environ["CELERY_BROKER_URL"].replace(":5672", f":{proxy.port}")
    deaths = copies.Deaths()
    common = env(copy_log, AGENTS_SHUTDOWN_GRACE="1")
    try:
        workers.start(concurrency=2, **common)
        workers.start(concurrency=2, **{**common, "CELERY_BROKER_URL": broker})
        workers.start(concurrency=2, **common)
        ids = [str(start(script).pk) for _ in range(50)]

        def kill(index: int) -> None:
            deaths.add(*copies.freeze_group(workers.processes[index].pid))
            workers.kill(index)

        time.sleep(3)
        kill(0)
        workers.start(concurrency=2, **common)  # worker 3
        time.sleep(3)
        # Worker 1 is connected through the proxy (its start is slow on a loaded machine).
        wait_until(lambda: proxy.opened() >= 1, timeout=60)
        assert proxy.cut() >= 1
        time.sleep(3)
        workers.processes[2].send_signal(signal.SIGTERM)  # a graceful deploy
        workers.processes[2].wait(30)
        workers.start(concurrency=2, **common)  # worker 4
        time.sleep(3)
        kill(3)
        wait_until(lambda: scenario.finished(ids), timeout=240)
    finally:
        proxy.close()
    deaths.from_worker_logs([path for path, _ in workers.logs])
    ledger_script = [{}, {"tool": "ledger.append"}, {}, {}]
    assert scenario.check(ids, script=ledger_script) == []
    assert copies.overlaps(copy_log, deaths) == []
    assert not AgentTask.objects.filter(status=TaskStatus.DEAD_LETTERED).exists()
    cut_short = [c for runs in copies.read(copy_log).values() for c in runs if c.end is None]
    assert cut_short, "the faults hit steps while they ran"
    assert AuditEvent.objects.filter(type="worker_lost").exists(), "a takeover was counted"


def test_the_overlap_check_finds_two_copies_at_once(tmp_path):
    """The evidence above can fail: two live copies of one step are reported."""
    log = tmp_path / "copies.log"
    log.write_text(
        "start t 1 10 100.0\nstart t 1 11 100.5\nend t 1 10 101.0\nend t 1 11 102.0\n"
        "start t 2 12 103.0\n"
        "start t 2 13 104.0\nend t 2 13 105.0\n"
    )
    deaths = copies.Deaths()
    deaths.add(104.5, {12})
    problems = copies.overlaps(log, deaths)
    assert len(problems) == 2, problems
    deaths = copies.Deaths()
    deaths.add(103.5, {12})
    assert len(copies.overlaps(log, deaths)) == 1


def test_hundreds_of_fast_steps_never_trip_over_their_own_commit(workers):
    """The next step is published inside the previous step's commit, so its delivery
    often arrives before that commit is visible: it must wait, never fail or drop."""
    workers.start(concurrency=2)
    owner = service_user("copies")
    script = [{"think": str(i)} for i in range(40)] + [{"final": "ok"}]
    ids = [
        str(task_start(owner=owner, agent="scripted", input={"script": script})[0].pk)
        for _ in range(8)
    ]
    wait_until(lambda: scenario.finished(ids), timeout=120)
    assert not AuditEvent.objects.filter(type__in=("step_failed", "republished")).exists()
    assert scenario.check(ids, script=script) == []
