"""How fast the runtime recovers, measured on real workers, RabbitMQ and PostgreSQL.

    python benchmarks/recovery.py [--runs 5]

Reports the median (and worst) over --runs of:

1. kill -> next committed step, for
   - a pool process killed with SIGKILL at the commit of a step (its worker's main
     process gives the message back; a fresh pool process runs the step again), and
   - a whole worker killed with kill -9 (main process and pool children) in the middle
     of a 3 s step, with a second worker running; that figure includes re-running the
     step, so the step's own duration is also shown and subtracted;
2. final failure -> DeadLetter row, for
   - a step whose retries are spent (from the last failing tool call), and
   - a step that kills its worker every time (from the last death).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, setup  # noqa: E402

# A test harness: fault injection (agents/faults.py) is only allowed with "test".
WORKER_ENV = setup(
    AGENTS_ENVIRONMENT="test",
    AGENTS_SCHEDULER_INTERVAL="0.2",
    AGENTS_RETRY_BACKOFF="0.05",
    CELERY_LOG_LEVEL="INFO",
)

import redis  # noqa: E402
from django.conf import settings  # noqa: E402

from agents.models import AgentTask, Checkpoint  # noqa: E402
from agents.services import service_user, task_start  # noqa: E402
from agents_project.worker_process import kill_worker_group, start_worker, stop_worker  # noqa: E402
from audit.models import AuditEvent, DeadLetter  # noqa: E402

LOGS = Path(WORKER_ENV["AGENTS_VAR_DIR"])


def worker(name: str, **env: str):
    log = open(LOGS / f"recovery-{name}.log", "wb")  # noqa: SIM115
    process = start_worker(
        env={**WORKER_ENV, **env}, concurrency=2, hostname=f"{name}@%h", output=log
    )
    return process


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"not within {timeout} s")


def wait_ready(name: str, process) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"worker {name} exited; see {LOGS}/recovery-{name}.log")
        return b"ready." in (LOGS / f"recovery-{name}.log").read_bytes()

    wait_for(ready, timeout=60)


def start(script: list[dict]) -> AgentTask:
    return task_start(owner=service_user("bench"), agent="scripted", input={"script": script})[0]


def stamp(when: datetime) -> float:
    return when.timestamp()


def pool_process_killed(runs: int) -> list[float]:
    once = Path(tempfile.mkdtemp()) / "fired"
    deaths = once.with_name("deaths")
    w = worker(
        "pool",
        AGENTS_FAULT_INJECTION="before_commit@3",
        AGENTS_FAULT_ONCE_FILE=str(once),
        AGENTS_FAULT_LOG=str(deaths),
    )
    results = []
    try:
        wait_ready("pool", w)
        for _ in range(runs):
            once.unlink(missing_ok=True)
            deaths.unlink(missing_ok=True)
            task = start([{"think": "a"}, {"think": "b"}, {"think": "c"}, {"final": "d"}])
            killed = float(wait_for(lambda: deaths.exists() and deaths.read_text().strip()))
            checkpoint = wait_for(lambda t=task: Checkpoint.objects.filter(task=t, step=3).first())
            results.append(stamp(checkpoint.created_at) - killed)
    finally:
        stop_worker(w)
    return results


def whole_worker_killed(runs: int) -> tuple[list[float], list[float]]:
    totals, reruns = [], []
    for run in range(runs):
        a = worker(f"a{run}")
        wait_ready(f"a{run}", a)
        task = start([{"think": "a"}, {"sleep": 3}, {"final": "done"}])
        wait_for(lambda t=task: Checkpoint.objects.filter(task=t, step=1).exists())
        b = worker(f"b{run}")  # B starts while A runs the 3 s step
        wait_ready(f"b{run}", b)
        time.sleep(0.2)
        if Checkpoint.objects.filter(task=task, step=2).exists():
            raise RuntimeError("the step finished before the kill; machine too slow")
        killed = time.time()
        kill_worker_group(a)
        checkpoint = wait_for(lambda t=task: Checkpoint.objects.filter(task=t, step=2).first())
        event = AuditEvent.objects.get(task=task, type="step", step=2)
        totals.append(stamp(checkpoint.created_at) - killed)
        reruns.append(event.payload["duration_ms"] / 1000)
        stop_worker(b)
    return totals, reruns


def retries_spent(runs: int) -> list[float]:
    r = redis.Redis.from_url(settings.REDIS_URL)
    w = worker("retries", AGENTS_MAX_RETRIES="2")
    results = []
    try:
        wait_ready("retries", w)
        for _ in range(runs):
            task = start([{"tool": "bench.fail_stamped"}])
            letter = wait_for(lambda t=task: DeadLetter.objects.filter(task=t).first())
            last_failure = float(r.lrange(f"bench:failed:{task.pk}", -1, -1)[0])
            results.append(stamp(letter.created_at) - last_failure)
    finally:
        stop_worker(w)
    return results


def worker_keeps_dying(runs: int) -> list[float]:
    deaths = Path(tempfile.mkdtemp()) / "deaths"
    w = worker("poison", AGENTS_FAULT_INJECTION="before_commit@2", AGENTS_FAULT_LOG=str(deaths))
    results = []
    try:
        wait_ready("poison", w)
        for _ in range(runs):
            deaths.unlink(missing_ok=True)
            task = start([{"think": "a"}, {"think": "b"}, {"final": "c"}])
            letter = wait_for(lambda t=task: DeadLetter.objects.filter(task=t).first())
            last_death = float(deaths.read_text().split()[-1])
            results.append(stamp(letter.created_at) - last_death)
    finally:
        stop_worker(w)
    return results


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.0f} ms   worst {max(values) * 1000:7.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    pool = pool_process_killed(args.runs)
    totals, reruns = whole_worker_killed(args.runs)
    overhead = [t - r for t, r in zip(totals, reruns, strict=True)]
    spent = retries_spent(args.runs)
    poison = worker_keeps_dying(args.runs)

    print(f"machine: {machine()}; {args.runs} runs each; RabbitMQ, PostgreSQL, 2 pool processes")
    print()
    print("kill -> next committed step")
    print(f"  pool process SIGKILLed at commit       {summary(pool)}")
    print(f"  whole worker kill -9, mid 3 s step     {summary(totals)}")
    print(f"    of which re-running the step         {summary(reruns)}")
    print(f"    recovery itself                      {summary(overhead)}")
    print("final failure -> DeadLetter row")
    print(f"  retries spent (last failed attempt)    {summary(spent)}")
    print(f"  worker killed every time (last death)  {summary(poison)}")


if __name__ == "__main__":
    main()
