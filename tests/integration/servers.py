"""Private PostgreSQL and RabbitMQ servers for tests that restart them.

Restarting the machine's shared servers would break every other test running beside
them; these start a throwaway server of the same kind on its own port and data
directory, as the services' own system users, and remove it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*command: str, timeout: float = 120) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=timeout)


@dataclass
class PrivatePostgres:
    data: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/agents"

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1"
        _run(
            "runuser",
            "-u",
            "postgres",
            "--",
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.data.parent / "log"),
            "-w",
            *args,
        )

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    versions = sorted(Path("/usr/lib/postgresql").iterdir())
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    root = Path(tempfile.mkdtemp(prefix="agents-pg-"))
    shutil.chown(root, "postgres")
    server = PrivatePostgres(data=root / "data", port=free_port(), bin=versions[-1] / "bin")
    _run(
        "runuser",
        "-u",
        "postgres",
        "--",
        str(server.bin / "initdb"),
        "-D",
        str(server.data),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
    )
    server.start()
    try:
        _run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(server.port),
            "-U",
            "postgres",
            "-c",
            "CREATE DATABASE agents",
        )
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PrivateRabbitMQ:
    root: Path
    port: int
    node: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                "env",
                *[f"{k}={v}" for k, v in self.env.items()],
                "/usr/lib/rabbitmq/bin/rabbitmq-server",
                "-detached",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        # The node takes a moment to register before it can even be asked how it is.
        deadline = time.monotonic() + 120
        while True:
            ready = subprocess.run(
                ["rabbitmqctl", "-n", self.node, "await_startup", "--timeout", "60"],
                capture_output=True,
                text=True,
                timeout=90,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = "\n".join(p.read_text() for p in (self.root / "log").glob("*.log"))
                raise RuntimeError(
                    f"RabbitMQ node {self.node} did not start: {ready.stderr}\n{log}"
                )
            time.sleep(1)

    def stop(self) -> None:
        _run("rabbitmqctl", "-n", self.node, "stop", timeout=120)

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    root = Path(tempfile.mkdtemp(prefix="agents-rabbit-"))
    port, dist = free_port(), free_port()
    (root / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
    (root / "enabled_plugins").write_text("[].\n")
    shutil.chown(root, "rabbitmq")
    for path in root.iterdir():
        shutil.chown(path, "rabbitmq")
    node = f"agents-test-{os.getpid()}@localhost"
    server = PrivateRabbitMQ(
        root=root,
        port=port,
        node=node,
        env={
            "HOME": "/var/lib/rabbitmq",
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
        },
    )
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
