"""What a durable step costs: the engine against two baselines, in one run.

    python benchmarks/step_overhead.py [--steps 200] [--tasks 16] [--concurrency 4]

Needs PostgreSQL, RabbitMQ and Redis (the same URLs as bin/test; override with
DATABASE_URL, CELERY_BROKER_URL, REDIS_URL). One worker process, the same queue and the
same Celery settings serve three arms:

  (a) bare     a Celery task that only enqueues its next hop;
  (b) txn      the same plus one checkpoint-shaped PostgreSQL transaction (lock the
               task row, insert a ~2 KB JSON checkpoint, insert two audit rows, update
               the row);
  (c) engine   the runtime running a ``scripted`` agent whose steps are ``think`` with
               ~2 KB of text (one checkpoint, two audit rows per step, plus the reads,
               the agent and the bookkeeping).

For each arm: ms per step for one task alone, and steps per second with N tasks at
once. Each figure is the median of --repeat runs after a warm-up. Time runs from the
first publish to the last step's commit (recorded by the worker).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ENV, machine, setup  # noqa: E402

# A 200-step script of ~2 KB thoughts is a ~400 KB input.
WORKER_ENV = setup(AGENTS_MAX_INPUT_BYTES=str(2**20))

import redis  # noqa: E402
from django.conf import settings  # noqa: E402

from agents.models import AgentTask  # noqa: E402
from agents.services import service_user, task_start  # noqa: E402
from agents_project.worker_process import start_worker, stop_worker  # noqa: E402
from audit.models import AuditEvent  # noqa: E402
from benchmarks.bench_tasks import PAD, bare, checkpointed  # noqa: E402


def wait_done(r: redis.Redis, run_ids: list[str]) -> float:
    """Latest completion time of the runs (worker clock)."""
    finished = []
    for run_id in run_ids:
        popped = r.blpop([f"bench:{run_id}"], timeout=600)
        if popped is None:
            raise RuntimeError(f"run {run_id} did not finish within 600 s")
        finished.append(float(popped[1]))
    return max(finished)


def arm_bare(r: redis.Redis, tasks: int, steps: int) -> float:
    runs = [uuid.uuid4().hex for _ in range(tasks)]
    started = time.time()
    for run_id in runs:
        bare.apply_async((run_id, steps))
    return wait_done(r, runs) - started


def arm_txn(r: redis.Redis, tasks: int, steps: int) -> float:
    owner = service_user("bench")
    runs = []
    for _ in range(tasks):
        task = AgentTask.objects.create(
            owner=owner, agent_name="bench", agent_version="1", input={}, state_version=1
        )
        runs.append((uuid.uuid4().hex, str(task.pk)))
    started = time.time()
    for run_id, task_id in runs:
        checkpointed.apply_async((run_id, task_id, 1, steps))
    return wait_done(r, [run_id for run_id, _ in runs]) - started


def arm_engine(r: redis.Redis, tasks: int, steps: int) -> float:
    owner = service_user("bench")
    script = [{"think": PAD} for _ in range(steps - 1)] + [{"final": "done"}]
    started = time.time()
    ids = [
        task_start(owner=owner, agent="scripted", input={"script": script})[0].pk
        for _ in range(tasks)
    ]
    while AgentTask.objects.filter(pk__in=ids, status="completed").count() < tasks:
        time.sleep(0.05)
        if (
            AgentTask.objects.filter(pk__in=ids)
            .exclude(status__in=("running", "pending", "completed"))
            .exists()
        ):
            raise RuntimeError("an engine task did not complete")
    last = (
        AuditEvent.objects.filter(task_id__in=ids, type="transition", payload__to="completed")
        .order_by("-created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    if last is None:
        raise RuntimeError("no engine task completed")
    return last.timestamp() - started


ARMS = {"bare": arm_bare, "txn": arm_txn, "engine": arm_engine}


def measure(r: redis.Redis, arm: str, tasks: int, steps: int, repeat: int) -> float:
    """Median elapsed seconds over ``repeat`` runs."""
    return statistics.median(ARMS[arm](r, tasks, steps) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per task, single-task runs")
    parser.add_argument("--tasks", type=int, default=16, help="tasks at once, throughput runs")
    parser.add_argument("--concurrent-steps", type=int, default=50, help="steps per task there")
    parser.add_argument("--concurrency", type=int, default=4, help="worker pool size")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    r = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=None)
    log = open(Path(ENV["AGENTS_VAR_DIR"]) / "bench-worker.log", "wb")  # noqa: SIM115
    worker = start_worker(
        env=WORKER_ENV, concurrency=args.concurrency, hostname="bench@%h", output=log
    )
    try:
        for arm in ARMS:  # warm-up: imports, connections, queue declarations
            measure(r, arm, 1, 10, 1)
        single = {arm: measure(r, arm, 1, args.steps, args.repeat) for arm in ARMS}
        many = {
            arm: measure(r, arm, args.tasks, args.concurrent_steps, args.repeat) for arm in ARMS
        }
    finally:
        stop_worker(worker)
        log.close()

    ms = {arm: single[arm] / args.steps * 1000 for arm in ARMS}
    rate = {arm: args.tasks * args.concurrent_steps / many[arm] for arm in ARMS}
    print(f"machine: {machine()}, worker concurrency {args.concurrency}")
    print(
        f"broker {settings.CELERY_BROKER_URL.split('@')[-1]}, database "
        f"{settings.DATABASES['default']['NAME']} (PostgreSQL), median of {args.repeat}\n"
    )
    print(f"| arm | ms/step, 1 task ({args.steps} steps) | steps/s, {args.tasks} tasks at once |")
    print("| --- | ---: | ---: |")
    for letter, arm in zip("abc", ARMS, strict=True):
        print(f"| ({letter}) {arm} | {ms[arm]:.2f} | {rate[arm]:.0f} |")
    print()
    for base in ("txn", "bare"):
        letter = "b" if base == "txn" else "a"
        alone = ms["engine"] / ms[base]
        together = rate[base] / rate["engine"]
        print(f"c/{letter}: {alone:.2f} (1 task)   {together:.2f} ({args.tasks} tasks)")


if __name__ == "__main__":
    main()
