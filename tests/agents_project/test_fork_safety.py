"""A process forked while another of its parent's threads holds a lock never waits for
that lock.

A Celery prefork worker forks a pool process (at start, and to replace one that died)
from its main process, where the scheduler, health and metrics threads run. A lock one
of them holds at that instant is copied held into the child and never released there:
the child's first step that needs it hangs for good, holding its message. This is what
left ``test_a_crash_after_publishing_the_next_step_never_runs_it_twice`` unfinished in
some runs: the replacement pool process waited forever in ``clock.now()`` for the lock
the scheduler thread held while it measured the database's clock.

Each case runs in a fresh interpreter: a thread takes the lock, the main thread forks,
and the child does what a step does with it, within ``TIMEOUT`` seconds, on the real
database and Redis. The last test is the same kind of fault on a socket: a new pool
process must not end the broker connections its parent keeps using.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import billiard
import pytest
from django.db import connection

from agents_project.celery import app

TIMEOUT = 10

SCRIPT = """
import os, signal, sys, threading
import django
django.setup()
{setup}
held, done = threading.Event(), threading.Event()

def hold():
    with {lock}:
        held.set()
        done.wait()

threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    signal.alarm({timeout})  # the default action ends the child: a hang fails the case
    try:
{act}
    except BaseException as exc:
        print("child failed:", repr(exc), file=sys.stderr, flush=True)
        os._exit(3)
    os._exit(0)
done.set()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""

CASES = {
    # The scheduler thread measuring the database's clock (the case found).
    "clock": (
        "from agents.core import clock",
        "clock._lock",
        "clock.resync(); clock.now()",
    ),
    # The metrics server reading breaker states while a pool process is forked.
    "breaker registry": (
        "from tools import breakers",
        "breakers._registry_lock",
        "breakers.breaker_status('fork-safety')",
    ),
    "a breaker's own lock": (
        "from tools import breakers\nbreaker = breakers._breaker('fork-safety')",
        "breaker._lock",
        "breakers.breaker_call(name='fork-safety', func=lambda: 1, trial_timeout=1,"
        " transitions=[])",
    ),
    # The scheduler recording a task's transition in prometheus-client's multiprocess
    # mode, whose values all share one lock.
    "metrics": (
        "import inspect\nfrom prometheus_client import values\n"
        "from agents import metrics\n"
        "lock = inspect.getclosurevars(values.ValueClass.inc).nonlocals['lock']",
        "lock",
        "metrics.task_finished(agent='fork-safety', status='completed')",
    ),
    # ... and the lock of its metric's ``labels()``, held while a new label set's value
    # is made.
    "a labelled metric": (
        "from agents import metrics",
        "metrics.TASKS_FINISHED._lock",
        "metrics.task_finished(agent='fork-safety', status='completed')",
    ),
    "a model-call metric": (
        "from llm import metrics as llm_metrics",
        "llm_metrics.TOKENS._lock",
        "llm_metrics.TOKENS.labels(agent='a', model='m', kind='prompt').inc()",
    ),
    # The health server reading breaker states through the breakers' Redis client.
    "the breakers' Redis connection pool": (
        "from tools import breakers\nclient = breakers._client()\nclient.ping()",
        "client.connection_pool._lock",
        "breakers.breaker_status('fork-safety')",
    ),
    "a metrics source read": (
        "from agents_project import metrics",
        "metrics._SourceRead._lock",
        "assert metrics._SourceRead.start('fork-safety', lambda: []).result(5) == []",
    ),
    # A step's lease heartbeat.
    "lease heartbeat": (
        "from agents.core import leases",
        "leases._heartbeat._lock",
        "leases._heartbeat.release()",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_child_forked_while_a_thread_holds_a_lock_does_not_wait_for_it(case, tmp_path, db):
    setup, lock, act = CASES[case]
    script = SCRIPT.format(
        setup=setup, lock=lock, act=textwrap.indent(act, " " * 8), timeout=TIMEOUT
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agents_project.settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        # This test's database (pytest-django's, not the one the URL names).
        "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0]
        + "/"
        + connection.settings_dict["NAME"],
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (
        f"the forked child {'hung' if done.returncode == 256 - 14 else 'failed'}"
        f" (exit {done.returncode}): {done.stderr[-2000:]}"
    )


def _noop() -> None:
    pass


def _publish_unroutable() -> None:
    """One confirmed publish on a pooled connection, with no retry: a connection that
    was reset fails it."""
    with app.producer_pool.acquire(block=True) as producer:
        producer.publish(b"{}", exchange="", routing_key="fork-safety.nowhere", retry=False)


def test_a_new_pool_process_leaves_the_parents_broker_connections_open():
    """A billiard process (what a Celery pool process is) runs kombu's after-fork cleanup,
    which closes the pool's connections; the parent's, through the same sockets, stay
    open: its next publish goes out on them without a reconnect."""
    _publish_unroutable()
    child = billiard.Process(target=_noop)
    child.start()
    child.join(30)
    assert child.exitcode == 0
    _publish_unroutable()
