"""How long a step whose holder vanished waits before it runs again, across "hosts".

    python benchmarks/takeover.py [--runs 3]

Needs root, ``ip`` and ``socat``: the vanishing worker runs in its own network
namespace under its own host name (``tests/integration/netns.py``), reaching
PostgreSQL, RabbitMQ and Redis through the host end of a veth link; a second worker
runs on this host. Default settings (``AGENTS_LEASE_TTL`` 6 s, ``AGENTS_SWEEP_GRACE``
10 s, ``AGENTS_BROKER_HEARTBEAT`` 10 s, ``AGENTS_SCHEDULER_INTERVAL`` 1 s) unless the
environment sets them. For each scenario, the time from the fault to the start of the
step's next copy (the ``slow_side_effect`` agent logs each copy's start), median and
worst over ``--runs``:

- kill: kill -9 of the whole far worker mid-step (its connections close; RabbitMQ
  returns the message, and the copy on this host takes the lease over once it expires);
- partition: the far worker's link cut mid-step (packets dropped, nothing closed: the
  sweep publishes the step again once the lease is past the grace);
- lost message: kill -9 of the far worker, then the work queue purged before any other
  worker consumed (no message left anywhere: the sweep again; the worker on this host
  starts after the purge, within the lease and grace).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    worker_env = setup(
        AGENTS_MODULES="benchmarks.bench_tasks,tests.integration.agents_for_tests",
        CELERY_LOG_LEVEL="INFO",
    )
    from agents.core.suspensions import task_cancel
    from agents.services import service_user, task_start
    from agents_project.worker_process import kill_worker_group, start_worker, stop_worker
    from tests.helpers import purge_queues, queue_depth
    from tests.integration.netns import network_host

    logs = Path(worker_env["AGENTS_VAR_DIR"])
    logs.mkdir(parents=True, exist_ok=True)
    copies = logs / "takeover-copies.log"
    env = {**worker_env, "AGENTS_COPY_LOG": str(copies)}

    def wait_for(predicate, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError(f"not within {timeout} s")

    def starts(task_id: str) -> list[tuple[float, str]]:
        if not copies.exists():
            return []
        found = []
        for line in copies.read_text().splitlines():
            kind, task, _, _, when, host = line.split()
            if kind == "start" and task == task_id:
                found.append((float(when), host))
        return found

    def worker(name: str, extra: dict[str, str], prefix: tuple[str, ...] = ()):
        log = open(logs / f"takeover-{name}.log", "wb")  # noqa: SIM115
        process = start_worker(
            env=extra, concurrency=1, hostname=f"{name}@%h", output=log, prefix=prefix
        )
        wait_for(lambda: b"ready." in (logs / f"takeover-{name}.log").read_bytes(), 120)
        return process

    def one_run(scenario: str, run: int) -> float:
        index = 1 + (os.getpid() + run) % 240
        with network_host(f"agb{os.getpid() % 100000}", index) as far:
            far_worker = worker(f"far{run}", far.env(env), far.prefix("far-host"))
            near = None
            try:
                task = task_start(
                    owner=service_user("bench"), agent="slow_side_effect", input={"sleep": 30}
                )[0]
                task_id = str(task.pk)
                wait_for(lambda: starts(task_id))
                if scenario != "lost message":
                    near = worker(f"near{run}", env)
                time.sleep(1.0)  # mid-step, the lease renewed
                fault = time.time()
                if scenario == "partition":
                    far.cut()
                else:
                    kill_worker_group(far_worker)
                if scenario == "lost message":
                    # Lost before anyone else consumed it; the worker on this host
                    # starts after (ready within the lease and grace on this machine).
                    wait_for(lambda: queue_depth() == 1, 30)
                    purge_queues()
                    near = worker(f"near{run}", env)
                second = wait_for(lambda: len(starts(task_id)) >= 2 and starts(task_id)[1])
                took = second[0] - fault
                assert second[1] != "far-host", second
                # Nothing of this run may occupy the next one's workers.
                task_cancel(task_id=task.pk, user=None, actor="benchmark")
                return took
            finally:
                if near is not None:
                    kill_worker_group(near)
                stop_worker(far_worker, timeout=5)
                purge_queues()

    # A task left running by an interrupted run would occupy a worker of this one.
    from agents.models import ACTIVE_STATUSES, AgentTask

    for left in AgentTask.objects.filter(agent_name="slow_side_effect", status__in=ACTIVE_STATUSES):
        task_cancel(task_id=left.pk, user=None, actor="benchmark")

    print(f"takeover across hosts, {machine()}, {args.runs} runs each")
    for scenario in ("kill", "partition", "lost message"):
        times = [one_run(scenario, run) for run in range(args.runs)]
        print(
            f"  {scenario:13s} fault -> next copy starts: median {statistics.median(times):5.1f} s,"
            f" worst {max(times):5.1f} s  ({', '.join(f'{t:.1f}' for t in times)})"
        )


if __name__ == "__main__":
    main()
