"""One clock for the whole runtime: the database's.

Leases, deadlines, timers and retries are compared across processes and machines, so
they must not depend on any one machine's clock: a worker whose clock runs two minutes
fast would otherwise time tasks out two minutes early. ``now()`` is this process's
estimate of the database's clock: the local clock plus an offset
measured with three ``SELECT clock_timestamp()`` at most every ``RESYNC`` seconds (the
error is at most half the shortest round trip, well under a millisecond on a LAN).

On SQLite (the zero-setup demo) the database is a file on this machine, so the offset
is zero and no query is made.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

RESYNC = 10.0

_lock = threading.Lock()
_offset = timedelta(0)
_synced_at = float("-inf")


def now() -> datetime:
    """The database's current time (aware, UTC), from the cached offset."""
    global _offset, _synced_at
    if connection.vendor != "postgresql":
        return timezone.now()
    if time.monotonic() - _synced_at > RESYNC:
        with _lock:
            if time.monotonic() - _synced_at > RESYNC:
                _offset = _measure()
                _synced_at = time.monotonic()
    return timezone.now() + _offset


def resync() -> None:
    """Measure the offset again at the next ``now()`` (after a fork, say)."""
    global _synced_at
    _synced_at = float("-inf")


def _lock_after_fork() -> None:
    """Give a forked child a free lock (``os.register_at_fork``). A worker's main
    process forks its pool processes while its scheduler thread may be measuring, lock
    held; the child's copy of a held lock is never released (no thread there owns it),
    and its first resync would wait for it forever, holding its step's message."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_lock_after_fork)


def _measure(samples: int = 3) -> timedelta:
    """The offset from the sample with the shortest round trip, whose error is at most
    half of it (the rule NTP's clock filter follows): on a loaded machine one round trip
    can take tens of milliseconds, most of it spent waiting to be scheduled."""
    best: tuple[timedelta, timedelta] | None = None
    with connection.cursor() as cursor:
        for _ in range(samples):
            before = timezone.now()
            cursor.execute("SELECT clock_timestamp()")
            (db_now,) = cursor.fetchone()
            after = timezone.now()
            trip = after - before
            if best is None or trip < best[0]:
                best = (trip, db_now - (before + trip / 2))
    assert best is not None
    return best[1]
