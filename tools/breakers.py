"""Circuit breakers: one per external dependency, one view shared by every process.

A tool names the breaker guarding its dependency (``@tool(..., breaker="weather-api")``),
or derives it from the call's arguments: ``http.get`` has one breaker per host and port,
``http:<host>:<port>``. The runner calls such a tool through ``breaker_call``:

- **closed**: calls go through. A failure that means "the dependency is unhealthy"
  counts: a ``RetryableError`` (what tools raise for a 5xx, a timeout, a refused
  connection), an ``OSError`` or httpx transport error that escaped the tool, or the
  step's soft time limit cutting a call short. ``AGENTS_BREAKER_FAIL_MAX`` such
  failures in a row open the breaker. Any other error (bad arguments, a 4xx the tool
  turned into a refusal) says the dependency answered; pybreaker has no neutral
  outcome, so it counts as a success and resets the count.
- **open**: calls fail at once, without touching the dependency, with ``CircuitOpen``:
  a ``RetryLater`` whose delay is the breaker's remaining open time, so the engine runs
  the step again then without spending one of its attempts.
- **half-open**: ``AGENTS_BREAKER_RESET_TIMEOUT`` seconds after opening, exactly one
  trial call is let through, by whichever process takes the trial lease; it closes the
  breaker, or opens it for another period. Other callers meanwhile fail fast and come
  back ``TRIAL_WAIT`` seconds later.
- **held open**: an operator can hold a breaker open (no trial calls) until they close
  it, or close any breaker at once (``tools.services``, ``manage.py breakers``).

The state is kept in Redis with pybreaker's ``CircuitRedisStorage``, so every worker
process and the web process share one view of each breaker. When ``REDIS_URL`` is
empty (the zero-setup demo), each process keeps its breakers in memory instead: they
work within the process but are not shared, and forcing one from a command only
affects the command's own process. If Redis is unreachable, calls go through unguarded
(pybreaker falls back to "closed" the same way) and the readiness check says why.

Every transition is logged. One that a call causes is also handed back to the caller
(``transitions``), and the runner writes it to that task's audit trail as a ``breaker``
event. ``breaker_states`` is the read side for the command, the API, the admin and
metrics.

What this module relies on in pybreaker 1.4 (read its source before upgrading):

- ``CircuitBreaker.call`` holds the breaker's lock while the guarded function runs,
  which would serialise every thread of a process on one dependency; ``_Breaker.call``
  holds it only to read the state.
- A process that merely notices a state another process set also notifies its
  listeners, so listeners cannot tell who caused a change. ``open``, ``half_open`` and
  ``close`` are only called by the process causing it: transitions are reported from
  there, and only when the shared state really changed.
- ``CircuitRedisStorage`` keeps ``opened_at`` in whole seconds (of each host's clock):
  open periods are exact to the second.
- Its half-open state lets every caller through; the one-trial rule is this module's, a
  Redis lock with a lease so that a worker dying mid-trial does not block the next one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import httpx
import pybreaker
import redis
import structlog
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from agents_project.errors import CircuitOpen, RetryableError, RetryLater
from tools.registry import registered_tools

logger = structlog.get_logger(__name__)

T = TypeVar("T")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

PREFIX = f"{settings.REDIS_KEY_PREFIX}:breaker"  # AGENTS_REDIS_KEY_PREFIX
# Every breaker name any process has used, so that listings see per-host breakers too.
NAMES_KEY = f"{settings.REDIS_KEY_PREFIX}:breakers"
# ``<dependency>@owner:<id>``: an owner's own breaker on a dependency.
OWNER_SEPARATOR = "@owner:"
# Seconds a caller waits while another process makes the trial call.
TRIAL_WAIT = 1.0
# The trial lease outlives the trial call's own timeout by this much.
TRIAL_MARGIN = 1.0

# Failures that say the dependency is unhealthy (see the module docstring).
_DEPENDENCY_FAILURES = (RetryableError, OSError, httpx.TransportError, SoftTimeLimitExceeded)


@dataclass(frozen=True)
class Transition:
    """A change of a breaker's state, caused by a call (or an operator)."""

    breaker: str
    from_state: str
    to_state: str
    failures: int
    reason: str

    def as_payload(self) -> dict[str, Any]:
        return {
            "breaker": self.breaker,
            "from": self.from_state,
            "to": self.to_state,
            "failures": self.failures,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BreakerStatus:
    """One breaker as every process sees it."""

    name: str
    state: str  # closed | open | half-open
    forced: bool  # held open by an operator until closed
    failures: int  # failures in a row (reset by a success or on closing)
    fail_max: int
    reset_timeout: float
    opened_at: datetime | None
    # Seconds until a trial call is let through; None while held open by an operator.
    remaining: float | None
    shared: bool  # state in Redis; False: this process's memory only

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["opened_at"] = self.opened_at.isoformat() if self.opened_at else None
        return data


_transitions: ContextVar[list[Transition] | None] = ContextVar("breaker_transitions", default=None)


class _Breaker(pybreaker.CircuitBreaker):
    """pybreaker's breaker, reporting the transitions this process causes."""

    def __init__(self, *, name: str, storage: pybreaker.CircuitBreakerStorage) -> None:
        conf = settings.AGENTS
        super().__init__(
            fail_max=conf["BREAKER_FAIL_MAX"],
            reset_timeout=conf["BREAKER_RESET_TIMEOUT"],
            exclude=[_not_a_dependency_failure],
            state_storage=storage,
            name=name,
        )
        self.storage = storage

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # The lock guards reading the state, not the call: see the module docstring.
        with self._lock:
            state = self.state
        return state.call(func, *args, **kwargs)

    def open(self, reason: str | None = None) -> bool:
        before, failures = self.current_state, self.fail_counter
        throw = super().open()
        default = "trial call failed" if before == HALF_OPEN else "failure threshold reached"
        self._changed(before, OPEN, failures, reason or default)
        return throw

    def half_open(self, reason: str | None = None) -> None:
        before = self.current_state
        super().half_open()
        self._changed(before, HALF_OPEN, self.fail_counter, reason or "reset timeout passed")

    def close(self, reason: str | None = None) -> None:
        before, failures = self.current_state, self.fail_counter
        super().close()
        self._changed(before, CLOSED, failures, reason or "trial call succeeded")

    def _changed(self, before: str, after: str, failures: int, reason: str) -> None:
        if before == after:
            return  # another process got there first; it reports the change
        transition = Transition(str(self.name), before, after, failures, reason)
        log = logger.warning if after == OPEN else logger.info
        log(f"circuit breaker {after}", **transition.as_payload())
        sink = _transitions.get()
        if sink is not None:
            sink.append(transition)


def _not_a_dependency_failure(exc: BaseException) -> bool:
    return isinstance(exc, RetryLater) or not isinstance(exc, _DEPENDENCY_FAILURES)


class _Trial(Protocol):
    def acquire(self) -> bool: ...

    def release(self) -> None: ...


class _RedisTrial:
    """The right to make the trial call, shared by every process, with a lease."""

    def __init__(self, client: redis.Redis, name: str, lease: float) -> None:
        self._lock = client.lock(f"{PREFIX}:{name}:trial", timeout=lease, blocking=False)

    def acquire(self) -> bool:
        return bool(self._lock.acquire())

    def release(self) -> None:
        # If the lease ran out first, whoever holds it now keeps it.
        with contextlib.suppress(redis.exceptions.LockError):
            self._lock.release()


class _LocalTrial:
    _locks: dict[str, threading.Lock] = {}

    def __init__(self, name: str) -> None:
        self._lock = self._locks.setdefault(name, threading.Lock())

    def acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()


@lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    # Bytes, not str: pybreaker decodes what it reads. Short timeouts: a slow Redis must
    # not stall every tool call.
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)


def _client() -> redis.Redis | None:
    url = settings.REDIS_URL
    return _client_for(url) if url else None


# This process's breaker objects, by (REDIS_URL, name). With Redis they are views of the
# shared state; without it, they are the state.
_BREAKERS: dict[tuple[str, str], _Breaker] = {}
_LOCAL_FORCED: set[str] = set()
_registry_lock = threading.Lock()


def new_breaker(name: str) -> _Breaker:
    """A new breaker object for ``name``. With Redis, every object of a name shares one
    state, as the objects in two processes do; in memory, each has its own."""
    client = _client()
    if client is None:
        return _Breaker(name=name, storage=pybreaker.CircuitMemoryStorage(CLOSED))
    storage = pybreaker.CircuitRedisStorage(CLOSED, client, namespace=f"{PREFIX}:{name}")
    client.sadd(NAMES_KEY, name)
    return _Breaker(name=name, storage=storage)


def _after_fork_in_child() -> None:
    """A forked child starts with no breaker objects, no Redis client and free locks
    (``os.register_at_fork``): a thread of its parent (a worker's health server, say)
    may hold the registry's lock, a breaker's own (pybreaker's), a local trial's or the
    Redis client's at the instant of the fork, and the child's copy of a held lock is
    never released.
    The child makes its breakers again on first use: with Redis they read the shared
    state; without it, a process's breakers were its own anyway."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _BREAKERS.clear()
    # The parent's Redis client too: redis-py's own fork check takes its pool's lock,
    # which the parent's health server may hold (``/readyz`` reads breaker states).
    _client_for.cache_clear()
    _LocalTrial._locks = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


def _breaker(name: str) -> _Breaker:
    key = (settings.REDIS_URL, name)
    with _registry_lock:
        breaker = _BREAKERS.get(key)
        if breaker is None:
            breaker = _BREAKERS[key] = new_breaker(name)
    conf = settings.AGENTS
    breaker.fail_max = conf["BREAKER_FAIL_MAX"]
    breaker.reset_timeout = conf["BREAKER_RESET_TIMEOUT"]
    return breaker


def _forced(name: str) -> bool:
    """Whether an operator holds ``name`` open. Raises ``redis.RedisError``: a caller
    that cannot tell must say so (``_through`` logs that it calls unguarded)."""
    client = _client()
    if client is None:
        return name in _LOCAL_FORCED
    return bool(client.exists(f"{PREFIX}:{name}:forced"))


def _remaining(breaker: _Breaker) -> float:
    opened_at = breaker.storage.opened_at
    if opened_at is None:
        return 0.0
    until = opened_at + timedelta(seconds=breaker.reset_timeout)
    return max((until - datetime.now(UTC)).total_seconds(), 0.0)


def _trial(name: str, lease: float) -> _Trial:
    client = _client()
    return _RedisTrial(client, name, lease) if client is not None else _LocalTrial(name)


def owner_breaker_name(name: str, owner_id: int) -> str:
    """The name of ``owner_id``'s own breaker on the dependency ``name``:
    ``<name>@owner:<id>`` (``http:api.example.com:443@owner:12``)."""
    return f"{name}{OWNER_SEPARATOR}{owner_id}"


def breaker_scope(name: str) -> tuple[str, int | None]:
    """``(dependency, owner id)`` of a breaker name; owner None for a shared breaker."""
    base, sep, owner = name.rpartition(OWNER_SEPARATOR)
    if sep and owner.isdigit():
        return base, int(owner)
    return name, None


def breaker_call(
    *,
    name: str,
    func: Callable[[], T],
    trial_timeout: float,
    transitions: list[Transition],
    owner_id: int | None = None,
) -> T:
    """Call ``func`` through the breaker ``name``; ``CircuitOpen`` instead, if it is open.

    ``trial_timeout`` bounds how long a trial call may take (the tool's timeout): the
    trial lease lasts that long plus a margin. Transitions this call causes are
    appended to ``transitions``.

    ``owner_id`` (the task's owner; the tool runner always passes it) scopes the
    breaker so that one owner cannot trip it for another (issue 12, item 5): the call
    goes through the owner's own breaker ``owner_breaker_name(name, owner_id)``, which
    counts that owner's failures in a row as above, inside the shared breaker ``name``,
    which fails fast for everyone but opens only when ``AGENTS_BREAKER_FAIL_MAX``
    failures in a row come from at least ``AGENTS_BREAKER_SHARED_MIN_OWNERS`` distinct
    owners within ``AGENTS_BREAKER_OWNER_WINDOW`` seconds (``_shared_guarded``).
    Without ``owner_id`` only the breaker ``name`` is used, counting every failure.
    """
    token = _transitions.set(transitions)
    try:
        if owner_id is None:
            return _through(name, func, trial_timeout, _guarded)
        own = owner_breaker_name(name, owner_id)

        def shared(breaker: _Breaker, call: Callable[[], T]) -> T:
            return _shared_guarded(breaker, call, owner_id)

        return _through(
            name, lambda: _through(own, func, trial_timeout, _guarded), trial_timeout, shared
        )
    finally:
        _transitions.reset(token)


def breaker_open_for(name: str) -> CircuitOpen | None:
    """The ``CircuitOpen`` a call through the breaker ``name`` would raise now without
    being made (held open by an operator, or open and not yet due for a trial); None
    otherwise, or when Redis cannot tell (``breaker_call`` then calls unguarded too).

    For a caller that makes its call outside ``breaker_call`` (the model gateway's
    asyncio requests): it checks here first, then reports the outcome through
    ``breaker_call`` with a function that returns or raises what the call did."""
    try:
        breaker = _breaker(name)
        forced = _forced(name)
        state = breaker.current_state
    except redis.RedisError:
        return None
    if forced:
        return CircuitOpen(name, delay=breaker.reset_timeout, reason="is held open by an operator")
    if state == OPEN:
        remaining = _remaining(breaker)
        if remaining > 0:
            return CircuitOpen(name, delay=remaining)
    return None


def _through(
    name: str,
    func: Callable[[], T],
    trial_timeout: float,
    guarded: Callable[[_Breaker, Callable[[], T]], T],
) -> T:
    """One breaker's rules around ``func``; ``guarded`` makes the call and counts it."""
    try:
        breaker = _breaker(name)
        forced = _forced(name)
        state = breaker.current_state
    except redis.RedisError as exc:
        logger.warning(
            "circuit breaker state unavailable; calling unguarded", breaker=name, error=repr(exc)
        )
        return func()
    if forced:
        raise CircuitOpen(name, delay=breaker.reset_timeout, reason="is held open by an operator")
    if state == OPEN:
        remaining = _remaining(breaker)
        if remaining > 0:
            raise CircuitOpen(name, delay=remaining)
    if state == CLOSED:
        return guarded(breaker, func)
    # Open for long enough, or half-open: one trial call, in one process.
    trial = _trial(name, trial_timeout + TRIAL_MARGIN)
    if not trial.acquire():
        raise CircuitOpen(name, delay=TRIAL_WAIT, reason="is making a trial call")
    try:
        return guarded(breaker, func)
    finally:
        trial.release()


def _guarded(breaker: _Breaker, func: Callable[[], T]) -> T:
    try:
        return breaker.call(func)
    except pybreaker.CircuitBreakerError as exc:
        # Either this call's failure opened the breaker (the failure is the context), or
        # another process opened it a moment ago.
        cause = exc.__context__
        reason = f"opened after {type(cause).__name__}" if cause is not None else "is open"
        delay = _remaining(breaker) or breaker.reset_timeout
        raise CircuitOpen(str(breaker.name), delay=delay, reason=reason) from exc


def _shared_guarded(breaker: _Breaker, func: Callable[[], T], owner_id: int) -> T:
    """Call ``func`` (the owner's own breaker around the dependency) and count the
    outcome against the shared breaker, which opens only when failures in a row come
    from enough distinct owners. A ``RetryLater`` (the owner's breaker failing fast,
    or the tool asking for a later retry) counts neither way; any other error that is
    not a dependency failure means the dependency answered, like a success."""
    state = breaker.current_state
    if state == OPEN:
        breaker.half_open()  # this process holds the trial lease (``_through``)
        state = HALF_OPEN
    try:
        result = func()
    except BaseException as exc:
        if isinstance(exc, RetryLater) and not _tripped_by(exc):
            raise
        if _not_a_dependency_failure(exc) and not _tripped_by(exc):
            _shared_success(breaker, state)
            raise
        if state == HALF_OPEN:
            breaker.open(reason=f"trial call failed ({type(exc).__name__})")
            _failing_owners_clear(str(breaker.name))
            raise CircuitOpen(
                str(breaker.name), delay=breaker.reset_timeout, reason="trial call failed"
            ) from exc
        breaker.storage.increment_counter()
        owners = _failing_owners_add(str(breaker.name), owner_id)
        failures = breaker.fail_counter
        if failures >= breaker.fail_max and owners >= settings.AGENTS["BREAKER_SHARED_MIN_OWNERS"]:
            breaker.open(reason=f"{failures} failures in a row from {owners} owners")
            raise CircuitOpen(
                str(breaker.name),
                delay=breaker.reset_timeout,
                reason=f"opened after {type(exc).__name__} seen by {owners} owners",
            ) from exc
        raise
    _shared_success(breaker, state)
    return result


def _tripped_by(exc: BaseException) -> BaseException | None:
    """The dependency failure behind a ``CircuitOpen`` that the owner's breaker raised
    when that very failure opened it (``_guarded``); None for a fail-fast."""
    if not isinstance(exc, CircuitOpen):
        return None
    cause = exc.__cause__
    failure = cause.__context__ if isinstance(cause, pybreaker.CircuitBreakerError) else None
    if failure is not None and not _not_a_dependency_failure(failure):
        return failure
    return None


def _shared_success(breaker: _Breaker, state: str) -> None:
    if state == HALF_OPEN:
        breaker.close(reason="trial call succeeded")
    elif breaker.fail_counter:
        breaker.storage.reset_counter()
    else:
        return
    _failing_owners_clear(str(breaker.name))


_LOCAL_FAILING: dict[str, dict[int, float]] = {}


def _failing_owners_add(name: str, owner_id: int) -> int:
    """Record a failure of ``owner_id`` on the shared breaker ``name``; return how many
    distinct owners failed on it within ``AGENTS_BREAKER_OWNER_WINDOW`` seconds (a
    Redis sorted set of owner ids scored by time, so every process shares it)."""
    window = float(settings.AGENTS["BREAKER_OWNER_WINDOW"])
    now = time.time()
    client = _client()
    if client is None:
        seen = _LOCAL_FAILING.setdefault(name, {})
        seen[owner_id] = now
        for owner, at in list(seen.items()):
            if at < now - window:
                del seen[owner]
        return len(seen)
    key = f"{PREFIX}:{name}:failing-owners"
    pipe = client.pipeline()
    pipe.zadd(key, {str(owner_id): now})
    pipe.zremrangebyscore(key, "-inf", now - window)
    pipe.zcard(key)
    pipe.expire(key, max(int(window) + 1, 1))
    return int(pipe.execute()[2])


def _failing_owners_clear(name: str) -> None:
    client = _client()
    if client is None:
        _LOCAL_FAILING.pop(name, None)
    else:
        client.delete(f"{PREFIX}:{name}:failing-owners")


def breaker_names() -> list[str]:
    """Every breaker: those tools declare, and every one any process has used."""
    names = {t.breaker for t in registered_tools().values() if isinstance(t.breaker, str)}
    names.update(name for url, name in list(_BREAKERS) if url == settings.REDIS_URL)
    client = _client()
    if client is not None:
        names.update(
            m.decode() if isinstance(m, bytes) else str(m) for m in client.smembers(NAMES_KEY)
        )
    return sorted(names)


def breaker_status(name: str) -> BreakerStatus:
    breaker = _breaker(name)
    forced = _forced(name)
    state = OPEN if forced else breaker.current_state
    remaining: float | None = None if forced else 0.0
    if state == OPEN and not forced:
        remaining = round(_remaining(breaker), 3)
    return BreakerStatus(
        name=name,
        state=state,
        forced=forced,
        failures=breaker.fail_counter,
        fail_max=breaker.fail_max,
        reset_timeout=breaker.reset_timeout,
        opened_at=breaker.storage.opened_at if state != CLOSED else None,
        remaining=remaining,
        shared=_client() is not None,
    )


def breaker_states() -> list[BreakerStatus]:
    """Every breaker's name, state, failure count and open time.

    The one read of breaker state for the ``breakers`` command, the API, the admin,
    readiness and metrics. Raises ``redis.RedisError`` if Redis is unreachable.
    """
    return [breaker_status(name) for name in breaker_names()]


def force_open(name: str, *, actor: str) -> None:
    """Hold the breaker open, with no trial calls, until ``force_close``."""
    breaker = _breaker(name)
    client = _client()
    if client is None:
        _LOCAL_FORCED.add(name)
    else:
        client.set(f"{PREFIX}:{name}:forced", actor)
    breaker.open(reason=f"held open by {actor}")


def force_close(name: str, *, actor: str) -> None:
    """Close the breaker now (and release an operator's hold); the count starts at zero."""
    breaker = _breaker(name)
    client = _client()
    if client is None:
        _LOCAL_FORCED.discard(name)
    else:
        client.delete(f"{PREFIX}:{name}:forced")
    breaker.close(reason=f"closed by {actor}")
