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
import uuid
from pathlib import Path

import psycopg
import pytest
from kombu import Connection

from agents.faults import POINTS
from agents.models import Checkpoint
from tests.helpers import wait_until, worker_env
from tests.integration import scenario
from tests.integration.servers import private_postgres, private_rabbitmq

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def progress(ids) -> int:
    return Checkpoint.objects.filter(task_id__in=ids, step__gt=0).count()


@pytest.mark.parametrize("point", POINTS)
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


def _scenario(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "tests.integration.scenario", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


def test_a_rabbitmq_restart_mid_run_loses_nothing(workers):
    with private_rabbitmq() as rabbit:
        env = worker_env(
            CELERY_BROKER_URL=rabbit.url,
            AGENTS_STUCK_AFTER="5",
            AGENTS_STEP_TIME_LIMIT="4",
            AGENTS_STEP_SOFT_TIME_LIMIT="3",
        )
        workers.start(concurrency=4, **env)
        ids = _scenario(env, "create", "20").split()
        wait_until(lambda: progress(ids) >= 30, timeout=60)
        rabbit.restart()
        wait_until(lambda: scenario.finished(ids), timeout=150)
    assert scenario.check(ids) == []


def test_a_postgresql_restart_mid_run_loses_nothing(workers, settings):
    names = uuid.uuid4().hex[:8]
    with private_postgres() as pg:
        env = worker_env(
            DATABASE_URL=pg.url,
            AGENTS_QUEUE=f"pgrestart-{names}.steps",
            AGENTS_DEAD_LETTER_EXCHANGE=f"pgrestart-{names}.dlx",
            AGENTS_DEAD_LETTER_QUEUE=f"pgrestart-{names}.dead",
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
        ids = _scenario(env, "create", "20").split()

        def count(sql: str) -> int:
            try:
                with psycopg.connect(
                    pg.url.replace("postgres://", "postgresql://"), connect_timeout=2
                ) as db:
                    return db.execute(sql).fetchone()[0]
            except psycopg.OperationalError:
                return -1

        wait_until(lambda: count("select count(*) from agents_checkpoint where step > 0") >= 30)
        pg.restart()
        wait_until(
            lambda: count("select count(*) from agents_agenttask where status = 'completed'") == 20,
            timeout=150,
        )
        problems = json.loads(_scenario(env, "check", *ids))
        workers.stop_all()
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.default_channel
        channel.queue_delete(f"pgrestart-{names}.steps")
        channel.queue_delete(f"pgrestart-{names}.dead")
        channel.exchange_delete(f"pgrestart-{names}.steps")
        channel.exchange_delete(f"pgrestart-{names}.dlx")
    assert problems == []
