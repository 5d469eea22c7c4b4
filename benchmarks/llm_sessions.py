"""The project's own arm of ``../shared/peers/llm/`` (LLM-shaped load): N ``llm`` sessions
of 3 model calls each, in the deployed shape: a prefork worker (compose's concurrency)
and the model gateway (``manage.py llm_gateway``), with ``AGENTS_LLM_GATEWAY`` on.

The contract is the harness's (its README): ``--n N --server URL --delay L --bound S
--out FILE``; one JSON line per run with the harness's fields (wall time, sessions done,
ratio to the ideal 3 x L, the most requests the fake server held at once, memory and CPU
of every process the arm starts, together), plus the median and 95th percentile of the
sessions' own durations (created to finished), CPU per model call, and the start phase.

    PROJECT_ARM="$PWD/.venv/bin/python $PWD/benchmarks/llm_sessions.py" \\
        bash ../shared/peers/llm/run.sh

Each run gets a private database (from the harness's migrated template ``llmc_tpl``,
made by its ``arm_project_llm.py --setup``), queues and Redis prefix; every process it
starts runs in its own process group and is stopped, and the queues and database are
removed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("LLMC_HARNESS", ROOT.parent / "shared" / "peers" / "llm"))
TERMINAL = ("completed", "failed", "cancelled", "timed_out", "dead_lettered")
INPUT = {"prompt": "What is 6*7, plus 1? Use calc.", "tools": ["calc"], "max_steps": 10}


def _harness() -> tuple[Any, Any]:
    """The harness's ``meter`` module and its ``arm_project_llm`` (database set-up)."""
    sys.path.insert(0, str(HARNESS))
    return importlib.import_module("meter"), importlib.import_module("arm_project_llm")


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 (the process owns it until the end of the run)
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--server", default="http://127.0.0.1:18811")
    parser.add_argument("--delay", type=float, default=2.0, help="the server's L, seconds")
    parser.add_argument("--bound", type=float, default=280.0, help="seconds before giving up")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's pool")
    parser.add_argument("--gateways", type=int, default=1, help="model gateway processes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    meter, shared = _harness()

    run = uuid.uuid4().hex[:8]
    db = f"llmc_{run}"
    shared.psql(f"CREATE DATABASE {db} TEMPLATE {shared.TPL} OWNER {shared.ROLE}")
    env = {**shared.base_env(db, run, args.server), "AGENTS_LLM_GATEWAY": "true"}
    env["AGENTS_LLM_GATEWAY_HEALTH_PORT"] = "0"
    env["AGENTS_HANDOFF_QUEUE"] = f"llmc-{run}.handoff"
    os.makedirs(env["AGENTS_VAR_DIR"], exist_ok=True)
    os.environ.update(env)
    import django

    django.setup()
    from django.db import connection
    from django.db.models import Count

    from agents.models import AgentTask
    from agents.services import service_user, task_start, tasks_start

    owner = service_user("llmc")
    logs = Path(os.environ.get("LLMC_TMP", "/tmp/llmc"))
    process_env = {**os.environ, **env}
    worker = _start(
        [sys.executable, "-m", "celery", "-A", "agents_project", "worker", "--pool=prefork",
         f"--concurrency={args.concurrency}", f"--hostname=llmc-{run}@%h", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle"],
        process_env,
        logs / f"worker-gateway-{args.n}-{run}.log",
    )  # fmt: skip
    gateways = [
        _start(
            [sys.executable, "manage.py", "llm_gateway"],
            process_env,
            logs / f"gateway-{args.n}-{run}-{i}.log",
        )
        for i in range(args.gateways)
    ]
    result: dict[str, Any] = {
        "arm": "project",
        "pool": "prefork + gateway",
        "concurrency": args.concurrency,
        "gateways": args.gateways,
        "n": args.n,
        "L": args.delay,
        "label": "deployed shape: worker + llm_gateway",
        "run": run,
    }
    try:
        warm = task_start(owner=owner, agent="llm", input=INPUT)[0].pk
        until = time.time() + 120
        while time.time() < until:
            status = AgentTask.objects.values_list("status", flat=True).get(pk=warm)
            if status in TERMINAL:
                break
            time.sleep(0.2)
        result["warmup_status"] = status
        meter.server(args.server, "/reset", "POST")
        meters = [meter.TreeMeter(p.pid).start() for p in (worker, *gateways)]
        machine = meter.machine_cpu()
        t0 = time.time()
        # Started as a client would start a thousand sessions: in batches (the API's
        # POST /api/tasks/batch/), 500 at a time.
        ids = [
            task.pk
            for start in range(0, args.n, 500)
            for task in tasks_start(
                owner=owner, agent="llm", inputs=[INPUT] * min(500, args.n - start)
            )
        ]
        result["start_phase_s"] = round(time.time() - t0, 2)
        terminal = 0
        while True:
            time.sleep(0.5)
            counts = dict(
                AgentTask.objects.filter(pk__in=ids)
                .values_list("status")
                .annotate(c=Count("pk"))
                .values_list("status", "c")
            )
            terminal = sum(v for k, v in counts.items() if k in TERMINAL)
            if terminal >= args.n or time.time() > t0 + args.bound:
                break
            if any(p.poll() is not None for p in (worker, *gateways)):
                break
        stats = [m.stop() for m in meters]
        result["machine_cpu_s"] = round(meter.machine_cpu() - machine, 2)
        result["rss_mb_max"] = round(sum(s["rss_mb_max"] for s in stats), 1)
        result["pss_mb_max"] = round(sum(s["pss_mb_max"] for s in stats), 1)
        result["cpu_s"] = round(sum(s["cpu_s"] for s in stats), 2)
        result["cpu_s_worker"] = stats[0]["cpu_s"]
        result["cpu_s_gateway"] = round(sum(s["cpu_s"] for s in stats[1:]), 2)
        result["pss_mb_worker"] = stats[0]["pss_mb_max"]
        result["pss_mb_gateway"] = round(sum(s["pss_mb_max"] for s in stats[1:]), 1)
        result["procs_max"] = sum(s["procs_max"] for s in stats)
        result["statuses"] = counts
        result["completed"] = counts.get("completed", 0)
        result["finished_all"] = terminal >= args.n
        rows = list(AgentTask.objects.filter(pk__in=ids).values_list("created_at", "finished_at"))
        ends = [f for _, f in rows if f is not None]
        if result["finished_all"] and ends:
            result["wall_s"] = round(max(ends).timestamp() - t0, 2)
        else:
            result["wall_s"] = round(time.time() - t0, 2)
            result["bounded"] = True
        sessions = sorted((f - c).total_seconds() for c, f in rows if f is not None)
        if sessions:
            result["session_p50_s"] = round(statistics.median(sessions), 2)
            result["session_p95_s"] = round(sessions[int(0.95 * (len(sessions) - 1))], 2)
        result["ideal_s"] = round(3 * args.delay, 2)
        result["ratio"] = round(result["wall_s"] / result["ideal_s"], 2)
        seen = meter.server(args.server, "/stats")
        result["max_in_flight"] = seen["max_in_flight"]
        result["model_requests"] = seen["requests"]
        if seen["requests"]:
            result["cpu_ms_per_model_call"] = round(1000 * result["cpu_s"] / seen["requests"], 1)
        errors = (
            AgentTask.objects.filter(pk__in=ids)
            .exclude(status="completed")
            .exclude(error="")
            .values_list("error", flat=True)[:3]
        )
        result["errors_sample"] = [e[:300] for e in errors]
    finally:
        for process in (*gateways, worker):
            _stop(process)
        connection.close()
        try:
            from kombu import Connection

            with Connection(env["CELERY_BROKER_URL"]) as conn:
                channel = conn.default_channel
                for queue in (
                    env["AGENTS_QUEUE"],
                    env["AGENTS_DEAD_LETTER_QUEUE"],
                    env["AGENTS_HANDOFF_QUEUE"],
                ):
                    channel.queue_delete(queue)
                channel.exchange_delete(env["AGENTS_DEAD_LETTER_EXCHANGE"])
                channel.exchange_delete(env["AGENTS_HANDOFF_QUEUE"])
                channel.exchange_delete(env["AGENTS_QUEUE"])
        except Exception as exc:
            result["cleanup_error"] = repr(exc)
        shared.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    meter.emit(result, args.out)


if __name__ == "__main__":
    main()
