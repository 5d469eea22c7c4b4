"""What a circuit breaker saves: ``http.get`` against a service that hangs.

    REDIS_URL=redis://127.0.0.1:6379/14 python benchmarks/breaker_fail_fast.py \\
        [--timeout 0.5] [--calls 200]

A real HTTP server on 127.0.0.1 accepts connections and never answers. The calls go
through the runtime's tool runner (``tools.runner.tools_run``) exactly as a step's do:
while the breaker is closed each one waits for its timeout; once
``AGENTS_BREAKER_FAIL_MAX`` of them have failed the breaker opens, and each call fails
at once (``CircuitOpen``) without touching the service. Needs Redis (breaker state);
no database or broker. Only this run's own breaker keys are written, and removed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agents_project.settings")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

import redis  # noqa: E402
from django.conf import settings  # noqa: E402

from agents.errors import CircuitOpen, RetryableError  # noqa: E402
from tests.tools.flaky_server import HANGING, FlakyServer  # noqa: E402
from tools.registry import ToolCall  # noqa: E402
from tools.runner import ToolRun, tools_run  # noqa: E402


def timed_call(run: ToolRun, call: ToolCall) -> tuple[float, type[Exception]]:
    started = time.perf_counter()
    try:
        tools_run(run, [call])
    except (CircuitOpen, RetryableError) as exc:
        return (time.perf_counter() - started) * 1000, type(exc)
    raise SystemExit("the hanging service answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=0.5, help="http.get timeout, s")
    parser.add_argument("--calls", type=int, default=200, help="calls with the breaker open")
    args = parser.parse_args()
    # The stand-in service is on loopback, which the outbound policy refuses by default.
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    server = FlakyServer().start()
    server.set_mode(HANGING)
    # No credentials: the run never reads the database.
    run = ToolRun(task_id=uuid.uuid4(), owner_id=0, step=1, events=[], credentials={})
    call = ToolCall("http.get", {"url": server.url("/slow"), "timeout": args.timeout})
    fail_max = settings.AGENTS["BREAKER_FAIL_MAX"]
    try:
        closed = [timed_call(run, call) for _ in range(fail_max)]
        opened = [timed_call(run, call) for _ in range(args.calls)]
    finally:
        server.stop()
        client = redis.Redis.from_url(settings.REDIS_URL)
        name = f"http:127.0.0.1:{server.port}"
        client.srem("agents:breakers", name)
        client.delete(*client.keys(f"agents:breaker:{name}:*"))
    assert all(kind is CircuitOpen for _, kind in opened), "the breaker did not open"
    open_ms = sorted(ms for ms, _ in opened)
    print(f"http.get to a hanging service, timeout {args.timeout:g} s, Redis {settings.REDIS_URL}")
    print(
        f"  breaker closed: {statistics.median(ms for ms, _ in closed):8.1f} ms per call "
        f"(median of {fail_max}; the calls that open it)"
    )
    print(
        f"  breaker open:   {statistics.median(open_ms):8.3f} ms per call "
        f"(median of {len(open_ms)}; p99 {open_ms[int(len(open_ms) * 0.99) - 1]:.3f} ms)"
    )
    print(f"  requests that reached the service: {len(server.requests)}")


if __name__ == "__main__":
    main()
