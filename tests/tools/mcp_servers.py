"""Starting the MCP servers the tests use, as a person would: the reference servers from
PyPI by their console scripts, and the tests' own HTTP server as a process on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
TIME_SERVER = str(BIN / "mcp-server-time")
GIT_SERVER = str(BIN / "mcp-server-git")
HTTP_SERVER = Path(__file__).with_name("mcp_http_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HttpServer:
    """The tests' own streamable-HTTP MCP server, in a process of its own."""

    port: int
    calls_file: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> HttpServer:
        log = self.calls_file.with_suffix(".log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(HTTP_SERVER), str(self.port), str(self.calls_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the MCP test server did not start: {self.calls_file}.log")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        """Every call the server received (all its runs), optionally of one tool."""
        if not self.calls_file.exists():
            return []
        lines = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        return [c for c in lines if tool is None or c["tool"] == tool]


@contextlib.contextmanager
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    server = HttpServer(port=free_port(), calls_file=tmp_path / "calls.jsonl").start()
    try:
        yield server
    finally:
        server.stop()


def git_repository(path: Path) -> Path:
    """A git repository with one commit, at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    run = lambda *args: subprocess.run(  # noqa: E731
        ["git", *args], cwd=path, check=True, capture_output=True
    )
    run("init", "-q", "-b", "main")
    run("config", "user.email", "tests@example.com")
    run("config", "user.name", "Tests")
    (path / "README").write_text("hello\n")
    run("add", "README")
    run("commit", "-q", "-m", "first")
    return path
