"""The embedded broker (agents_project/broker.py) between real processes.

The demo depends on it, so it is proven here, not assumed: hundreds of messages handed
back and forth between two processes, and a burst consumed by two competing processes,
each message exactly once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue

import agents_project.broker  # noqa: F401  (registers the transport)

ECHO = textwrap.dedent(
    """
    import sys
    from kombu import Connection, Exchange, Queue
    import agents_project.broker
    url, name = sys.argv[1], sys.argv[2]
    ping = Queue("ping", Exchange("ping"), "ping")
    pong = Queue("pong", Exchange("pong"), "pong")
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn:
        producer = conn.Producer()
        def handle(body, message):
            if body == "stop":
                message.ack()
                raise SystemExit(0)
            producer.publish({"n": body["n"], "by": name}, exchange=pong.exchange,
                             routing_key="pong", declare=[pong])
            message.ack()
        with conn.Consumer(ping, callbacks=[handle], prefetch_count=1):
            producer.publish({"ready": name}, exchange=pong.exchange, routing_key="pong",
                             declare=[pong])
            while True:
                try:
                    conn.drain_events(timeout=30)
                except TimeoutError:
                    raise SystemExit(2)
    """
)

PING = Queue("ping", Exchange("ping"), "ping")
PONG = Queue("pong", Exchange("pong"), "pong")


def _url(tmp_path: Path) -> str:
    return f"embedded+sqlite:///{tmp_path / 'broker.sqlite3'}"


def _echo(url: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", ECHO, url, name], cwd=Path(__file__).parent.parent
    )


def _collect(conn: Connection, count: int, timeout: float = 60) -> list[dict]:
    got: list[dict] = []

    def handle(body, message):
        got.append(body)
        message.ack()

    deadline = time.monotonic() + timeout
    with conn.Consumer(PONG, callbacks=[handle]):
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
    return got


def test_three_hundred_hops_between_two_processes(tmp_path):
    url = _url(tmp_path)
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn:
        producer = conn.Producer()
        PING(conn.default_channel).declare()
        PONG(conn.default_channel).declare()
        echo = _echo(url, "echo")
        try:
            assert _collect(conn, 1) == [{"ready": "echo"}]
            started = time.monotonic()
            for n in range(300):
                producer.publish(
                    {"n": n}, exchange=PING.exchange, routing_key="ping", declare=[PING]
                )
                reply = _collect(conn, 1, timeout=20)
                assert reply == [{"n": n, "by": "echo"}], f"hop {n}"
            elapsed = time.monotonic() - started
            producer.publish("stop", exchange=PING.exchange, routing_key="ping")
            assert echo.wait(20) == 0
        finally:
            echo.kill()
    print(f"300 hops in {elapsed:.2f} s ({elapsed / 300 * 1000:.1f} ms per hop)")


def test_a_burst_is_consumed_once_by_competing_processes(tmp_path):
    url = _url(tmp_path)
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn:
        producer = conn.Producer()
        PING(conn.default_channel).declare()
        PONG(conn.default_channel).declare()
        echoes = [_echo(url, "a"), _echo(url, "b")]
        try:
            # Both consume before the burst starts, so both can take part in it.
            ready = _collect(conn, 2)
            assert sorted(r["ready"] for r in ready) == ["a", "b"]
            for n in range(400):
                producer.publish(
                    {"n": n}, exchange=PING.exchange, routing_key="ping", declare=[PING]
                )
            replies = _collect(conn, 400)
            for _ in echoes:
                producer.publish("stop", exchange=PING.exchange, routing_key="ping")
            for echo in echoes:
                assert echo.wait(20) == 0
        finally:
            for echo in echoes:
                echo.kill()
    numbers = sorted(r["n"] for r in replies)
    assert numbers == list(range(400)), "every message exactly once"
    assert {r["by"] for r in replies} == {"a", "b"}, "both consumers took work"
