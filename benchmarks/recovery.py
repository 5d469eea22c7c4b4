"""How fast the runtime recovers, measured on real workers, RabbitMQ and PostgreSQL.

    python benchmarks/recovery.py [--runs 5]

Reports the median (and worst) over --runs of:

1. kill -> replacement start: from the kill of the process running a 10 s step to
   the start of the step's next copy (the ``recorded`` agent writes each copy's start
   to ``AGENTS_COPY_LOG``; the issue's goal is a median of 5 s at most), for
   - a pool process killed with SIGKILL mid-step (its worker's main process gives the
     message back; the redelivery sees the lease holder's process is gone), and
   - a whole worker killed with kill -9 (main process and pool children) mid-step,
     with a second worker running (RabbitMQ returns the message when the connection
     drops; the second worker takes the lease over);
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

# A test harness: fault injection (agents/core/faults.py) is only allowed with "test".
WORKER_ENV = setup(
    AGENTS_ENVIRONMENT="test",
    AGENTS_SCHEDULER_INTERVAL="0.2",
    AGENTS_RETRY_BACKOFF="0.05",
    AGENTS_MODULES="benchmarks.bench_tasks,tests.integration.agents_for_tests",
    CELERY_LOG_LEVEL="INFO",
)

import os  # noqa: E402
import signal  # noqa: E402

import redis  # noqa: E402
from django.conf import settings  # noqa: E402

from agents.models import AgentTask  # noqa: E402
from agents.services import service_user, task_start  # noqa: E402
from agents_project.worker_process import kill_worker_group, start_worker, stop_worker  # noqa: E402
from audit.models import DeadLetter  # noqa: E402
from tests.integration import agents_for_tests  # noqa: E402, F401  ("recorded")

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


def start(script: list[dict], agent: str = "scripted") -> AgentTask:
    return task_start(owner=service_user("bench"), agent=agent, input={"script": script})[0]


def stamp(when: datetime) -> float:
    return when.timestamp()


COPY_LOG = LOGS / "recovery-copies.log"
# Long enough for a second worker to start on a busy machine before the kill.
LONG_STEP: list[dict] = [{"think": "a"}, {"sleep": 10}, {"final": "done"}]


def copy_starts(task: AgentTask, step: int) -> list[tuple[int, float]]:
    """(pid, start time) of every copy of ``step`` of the task that started."""
    if not COPY_LOG.exists():
        return []
    found = []
    for line in COPY_LOG.read_text().splitlines():
        event, task_id, number, pid, when = line.split()
        if event == "start" and task_id == str(task.pk) and int(number) == step:
            found.append((int(pid), float(when)))
    return found


def replacement_start(task: AgentTask, killed: float) -> float:
    """Seconds from ``killed`` to the start of the second copy of step 2."""
    _, started = wait_for(lambda: len(copy_starts(task, 2)) >= 2 and copy_starts(task, 2)[1])
    wait_for(lambda t=task: AgentTask.objects.filter(pk=t.pk, status="completed").exists())
    return started - killed


def pool_process_killed(runs: int) -> list[float]:
    w = worker("pool", AGENTS_COPY_LOG=str(COPY_LOG))
    results = []
    try:
        wait_ready("pool", w)
        for _ in range(runs):
            task = start(LONG_STEP, agent="recorded")
            [(pid, _)] = wait_for(lambda t=task: copy_starts(t, 2))
            time.sleep(1.0)  # mid-step
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            results.append(replacement_start(task, killed))
    finally:
        stop_worker(w)
    return results


def whole_worker_killed(runs: int) -> list[float]:
    results = []
    for run in range(runs):
        a = worker(f"a{run}", AGENTS_COPY_LOG=str(COPY_LOG))
        wait_ready(f"a{run}", a)
        b = None
        try:
            task = start(LONG_STEP, agent="recorded")
            wait_for(lambda t=task: copy_starts(t, 2))
            b = worker(f"b{run}", AGENTS_COPY_LOG=str(COPY_LOG))  # B starts while A runs
            wait_ready(f"b{run}", b)
            if AgentTask.objects.filter(pk=task.pk, current_step__gt=2).exists():
                raise RuntimeError("the step finished before the kill; machine too slow")
            killed = time.time()
            kill_worker_group(a)
            results.append(replacement_start(task, killed))
        finally:
            kill_worker_group(a)
            if b is not None:
                stop_worker(b)
    return results


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

    COPY_LOG.unlink(missing_ok=True)
    pool = pool_process_killed(args.runs)
    whole = whole_worker_killed(args.runs)
    spent = retries_spent(args.runs)
    poison = worker_keeps_dying(args.runs)

    print(f"machine: {machine()}; {args.runs} runs each; RabbitMQ, PostgreSQL, 2 pool processes")
    print(f"load average at the end: {os.getloadavg()}")
    print()
    print("kill -> replacement start (a 10 s step killed mid-step; goal: median <= 5 s)")
    print(f"  pool process SIGKILLed mid-step        {summary(pool)}")
    print(f"  whole worker kill -9, mid-step         {summary(whole)}")
    print("final failure -> DeadLetter row")
    print(f"  retries spent (last failed attempt)    {summary(spent)}")
    print(f"  worker killed every time (last death)  {summary(poison)}")


if __name__ == "__main__":
    main()
