"""Nothing lost, nothing done twice: real workers killed with real signals, a real broker
and a real database restarted under them.

Every test ends with ``scenario.check``: each task completed, exactly one checkpoint per
step, steps committed in order, a gap-free audit trail, and exactly one ledger row per
idempotency key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from agents.core.faults import WORKER_POINTS
from agents.models import Checkpoint
from tests.helpers import private_queues, wait_until, worker_env
from tests.integration import scenario
from tests.integration.servers import private_postgres, private_rabbitmq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def progress(ids) -> int:
    return Checkpoint.objects.filter(task_id__in=ids, step__gt=0).count()


@pytest.mark.parametrize("point", WORKER_POINTS)
def test_a_worker_killed_at_a_point_of_a_step_loses_nothing(workers, point, tmp_path):
    fired = tmp_path / "fired"
    workers.start(
        concurrency=2,
        AGENTS_FAULT_INJECTION=f"{point}@2",
        AGENTS_FAULT_ONCE_FILE=str(fired),
    )
    ids = scenario.create(6)
    wait_until(fired.exists, timeout=60)
    # The fault killed a pool process at the point; now the whole worker goes too, and
    # a fresh worker must finish everything it held.
    workers.kill(0)
    workers.start(concurrency=2)
    wait_until(lambda: scenario.finished(ids), timeout=90)
    assert scenario.check(ids) == []


def test_kill_9_of_a_whole_worker_with_many_tasks_in_flight(workers):
    workers.start(concurrency=4)
    ids = scenario.create(40)
    wait_until(lambda: progress(ids) >= 60, timeout=60)
    workers.kill(0)
    workers.start(concurrency=4)
    wait_until(lambda: scenario.finished(ids), timeout=120)
    assert scenario.check(ids) == []


def test_a_rabbitmq_restart_mid_run_loses_nothing(workers):
    with private_rabbitmq() as rabbit:
        env = worker_env(
            CELERY_BROKER_URL=rabbit.url,
            AGENTS_STUCK_AFTER="5",
            AGENTS_STEP_TIME_LIMIT="4",
            AGENTS_STEP_SOFT_TIME_LIMIT="3",
        )
        workers.start(concurrency=4, **env)
        ids = scenario.run(env, "create", "20").split()
        wait_until(lambda: progress(ids) >= 30, timeout=60)
        rabbit.restart()
        wait_until(lambda: scenario.finished(ids), timeout=150)
    assert scenario.check(ids) == []


def test_a_postgresql_restart_mid_run_loses_nothing(workers):
    with private_postgres() as pg, private_queues("pgrestart") as names:
        env = worker_env(
            **names,
            DATABASE_URL=pg.url,
            AGENTS_STUCK_AFTER="5",
            AGENTS_STEP_TIME_LIMIT="4",
            AGENTS_STEP_SOFT_TIME_LIMIT="3",
        )
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=ROOT,
            env={**os.environ, **env},
            check=True,
            timeout=120,
        )
        workers.start(concurrency=4, **env)
        ids = scenario.run(env, "create", "20").split()

        def count(sql: str) -> int:
            try:
                url = pg.url.replace("postgres://", "postgresql://")
                with psycopg.connect(url, connect_timeout=2) as db:
                    return db.execute(sql).fetchone()[0]
            except psycopg.OperationalError:
                return -1

        wait_until(lambda: count("select count(*) from agents_checkpoint where step > 0") >= 30)
        pg.restart()
        wait_until(
            lambda: count("select count(*) from agents_agenttask where status = 'completed'") == 20,
            timeout=150,
        )
        problems = json.loads(scenario.run(env, "check", *ids))
        workers.stop_all()
    assert problems == []
