"""Evidence of how many copies of a step ran, and when, for the one-live-copy tests.

Workers load ``tests.integration.agents_for_tests`` and run the ``recorded`` agent,
which appends ``start``/``end`` lines (task, step, process id, time) to the file named
by ``AGENTS_COPY_LOG``. A copy with no ``end`` was stopped by its process's death: the
test records when it stopped which processes before killing them (``Deaths``,
``freeze_group``), and a worker that froze its pool for a graceful shutdown logs the
moment it did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Copy:
    pid: int
    start: float
    end: float | None = None


@dataclass
class Deaths:
    """When which processes stopped running code: ``(time, pids)`` pairs."""

    events: list[tuple[float, set[int]]] = field(default_factory=list)

    def add(self, when: float, pids: set[int]) -> None:
        self.events.append((when, set(pids)))

    def from_worker_logs(self, paths: list[Path]) -> None:
        """Add the pool freezes that workers logged on a graceful shutdown."""
        pattern = re.compile(r"pool frozen for shutdown at ([0-9.]+): pids \[([0-9, ]*)\]")
        for path in paths:
            if path.exists():
                for match in pattern.finditer(path.read_text(errors="replace")):
                    pids = {int(p) for p in match.group(2).split(",") if p.strip()}
                    self.add(float(match.group(1)), pids)

    def end_of(self, copy: Copy) -> float | None:
        after = [when for when, pids in self.events if copy.pid in pids and when >= copy.start]
        return min(after) if after else None


def freeze_group(pgid: int, timeout: float = 30.0) -> tuple[float, set[int]]:
    """Stop (SIGSTOP) every process of group ``pgid`` (a worker and its pool) and wait
    until each of their threads is stopped; returns ``(when, pids)``: none of them runs
    code after ``when``, so a test that kills them next records the right death. The
    time read before the kill instead misses a copy that starts between the two, which
    then seems to outlive its process."""
    os.killpg(pgid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = _group_states(pgid)
        if all(set(threads) <= set("TtZX") for threads in states.values()):
            return time.time(), set(states)
        if time.monotonic() > deadline:
            raise TimeoutError(f"process group {pgid} did not stop: {states}")
        time.sleep(0.01)


def _group_states(pgid: int) -> dict[int, str]:
    """``{pid: the state letter of each of its threads}`` (R, S, T, Z, ... from
    ``/proc``) of the processes in group ``pgid``: a process stops thread by thread."""
    states = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _stat(Path("/proc", entry))[2:3] != [str(pgid)]:
            continue
        try:
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        states[int(entry)] = "".join(
            fields[0] for tid in tids if (fields := _stat(Path("/proc", entry, "task", tid)))
        )
    return states


def _stat(path: Path) -> list[str]:
    """The fields of ``path/stat`` after the command name (state, ppid, pgrp, ...);
    empty if the process or thread is gone."""
    try:
        return (path / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def read(path: Path) -> dict[tuple[str, int], list[Copy]]:
    """The copies of each ``(task id, step)``, in the order they started."""
    copies: dict[tuple[str, int], list[Copy]] = defaultdict(list)
    if not path.exists():
        return copies
    for line in path.read_text().splitlines():
        kind, task, step, pid, when = line.split()
        key = (task, int(step))
        if kind == "start":
            copies[key].append(Copy(int(pid), float(when)))
        else:
            for copy in reversed(copies[key]):
                if copy.pid == int(pid) and copy.end is None:
                    copy.end = float(when)
                    break
    for runs in copies.values():
        runs.sort(key=lambda c: c.start)
    return copies


def overlaps(path: Path, deaths: Deaths | None = None) -> list[str]:
    """Every pair of copies of one step that ran at the same time (empty: none did)."""
    deaths = deaths or Deaths()
    problems = []
    for (task, step), runs in read(path).items():
        for earlier, later in zip(runs, runs[1:], strict=False):
            end = earlier.end if earlier.end is not None else deaths.end_of(earlier)
            if end is None or end > later.start:
                problems.append(
                    f"{task} step {step}: pid {earlier.pid} ran {earlier.start:.3f}-{end} "
                    f"while pid {later.pid} started at {later.start:.3f}"
                )
    return problems


def starts(path: Path) -> dict[tuple[str, int], int]:
    return {key: len(runs) for key, runs in read(path).items()}


class Proxy:
    """A TCP proxy on loopback whose connections the test can cut, so a worker loses
    its broker connection for real while the broker and every other client carry on."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def opened(self) -> int:
        """Connections made through the proxy since the last cut."""
        with self._lock:
            return len(self._sockets) // 2

    def cut(self) -> int:
        """Close every connection through the proxy; new ones are accepted again."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        return len(sockets) // 2

    def close(self) -> None:
        self._closed = True
        self.server.close()
        self.cut()
