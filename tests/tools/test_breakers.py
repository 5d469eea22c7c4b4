"""Circuit breakers against real Redis, a real flaky HTTP service and real workers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pybreaker
import pytest
from django.core.management import CommandError, call_command

from agents.definition import ToolCall
from agents.errors import CircuitOpen, PermanentError, RetryableError, ToolArgumentError
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from agents_project.errors import InvalidInput, NotFound
from audit.models import AuditEvent, DeadLetter, EventType
from tests.helpers import run_until_idle, wait_until
from tests.tools.flaky_server import FAILING, HANGING, HEALTHY
from tools import breakers
from tools.breakers import CLOSED, HALF_OPEN, OPEN, Transition, breaker_call, new_breaker
from tools.runner import ToolRun, tools_run
from tools.selectors import breaker_get, breaker_states
from tools.services import breaker_force_close, breaker_force_open

NAME = "test-dependency"


@pytest.fixture
def tight(settings):
    """Three failures open a breaker; it stays open for a second."""
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": 3, "BREAKER_RESET_TIMEOUT": 1.0}


class Dependency:
    """A guarded function that counts its calls and fails, hangs or answers on demand."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        if self.error is not None:
            raise self.error
        return "answer"


def call(dependency: Dependency, transitions: list[Transition] | None = None, name: str = NAME):
    return breaker_call(
        name=name,
        func=dependency,
        trial_timeout=5.0,
        transitions=[] if transitions is None else transitions,
    )


def wait_for_trial(name: str = NAME) -> None:
    """Until the breaker's reset timeout has passed (Redis keeps its open time in seconds)."""
    wait_until(lambda: breaker_get(name=name).remaining == 0, timeout=5, interval=0.05)


def open_breaker(name: str = NAME) -> None:
    failing = Dependency(RetryableError("HTTP 503"))
    for _ in range(3):
        with pytest.raises(RetryableError):
            call(failing, name=name)
    assert breaker_get(name=name).state == OPEN


def test_two_processes_see_one_breaker_through_redis(tight):
    # Two breaker objects for one name are what two worker processes hold.
    first, second = new_breaker(NAME), new_breaker(NAME)
    failing = Dependency(RetryableError("HTTP 503"))
    for _ in range(2):
        with pytest.raises(RetryableError):
            first.call(failing)
    assert second.fail_counter == 2
    with pytest.raises(pybreaker.CircuitBreakerError):
        first.call(failing)  # the third failure opens it
    assert second.current_state == OPEN
    healthy = Dependency()
    with pytest.raises(pybreaker.CircuitBreakerError):
        second.call(healthy)
    assert healthy.calls == 0, "the other process's open breaker must stop this call"
    second.close()
    assert first.current_state == CLOSED
    assert first.fail_counter == 0


def test_failures_open_the_breaker_and_later_calls_fail_fast_with_the_remaining_time(settings):
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": 3, "BREAKER_RESET_TIMEOUT": 30.0}
    failing = Dependency(RetryableError("HTTP 503"))
    for _ in range(2):
        with pytest.raises(RetryableError):
            call(failing)
    transitions: list[Transition] = []
    with pytest.raises(CircuitOpen) as tripped:
        call(failing, transitions)
    assert transitions == [Transition(NAME, CLOSED, OPEN, 3, "failure threshold reached")]
    assert 28 <= tripped.value.delay <= 30
    cause = tripped.value.__cause__
    assert cause is not None and isinstance(cause.__context__, RetryableError)

    calls_before = failing.calls
    transitions = []
    with pytest.raises(CircuitOpen) as fast:
        call(failing, transitions)
    assert failing.calls == calls_before, "an open breaker must not call the dependency"
    assert transitions == []
    assert 0 < fast.value.delay <= 30
    status = breaker_get(name=NAME)
    assert (status.state, status.failures, status.forced) == (OPEN, 3, False)
    assert status.opened_at is not None
    assert status.remaining is not None and 0 < status.remaining <= 30


def test_errors_that_are_not_the_dependencys_fault_do_not_open_it(tight):
    for error in (
        ToolArgumentError("t", "args.x", "is required"),
        PermanentError("refused"),
        KeyError("a bug in the tool"),
    ):
        for _ in range(5):
            with pytest.raises(type(error)):
                call(Dependency(error))
    status = breaker_get(name=NAME)
    assert (status.state, status.failures) == (CLOSED, 0)
    # Connection errors and timeouts that escape a tool do count.
    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            call(Dependency(ConnectionRefusedError("refused")))
    with pytest.raises(CircuitOpen):
        call(Dependency(TimeoutError("timed out")))


def test_after_the_reset_timeout_exactly_one_trial_call_goes_through(tight):
    open_breaker()
    wait_for_trial()
    trial = Dependency()
    trial.release.clear()  # the trial call hangs until released
    trial_transitions: list[Transition] = []
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(call(trial, trial_transitions)))
    thread.start()
    assert trial.entered.wait(5)
    assert breaker_get(name=NAME).state == HALF_OPEN

    # Meanwhile, another process's call is not let through: it waits for the trial.
    other = Dependency()
    with pytest.raises(CircuitOpen) as waiting:
        call(other, name=NAME)
    assert other.calls == 0
    assert waiting.value.delay == breakers.TRIAL_WAIT

    trial.release.set()
    thread.join(5)
    assert outcome == ["answer"]
    assert [(t.from_state, t.to_state) for t in trial_transitions] == [
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert call(other) == "answer"
    assert breaker_get(name=NAME).state == CLOSED


def test_a_failed_trial_opens_the_breaker_for_another_period(tight):
    open_breaker()
    wait_for_trial()
    transitions: list[Transition] = []
    failing = Dependency(RetryableError("still down"))
    with pytest.raises(CircuitOpen):
        call(failing, transitions)
    assert failing.calls == 1
    assert [(t.from_state, t.to_state, t.reason) for t in transitions] == [
        (OPEN, HALF_OPEN, "reset timeout passed"),
        (HALF_OPEN, OPEN, "trial call failed"),
    ]
    status = breaker_get(name=NAME)
    assert status.state == OPEN
    assert status.remaining is not None and status.remaining > 0


def test_an_operator_holds_a_breaker_open_until_closing_it(tight):
    with pytest.raises(NotFound):
        breaker_force_close(name="no-such-breaker", actor="test")
    with pytest.raises(InvalidInput) as refused:
        breaker_force_open(name="not a name", actor="test")
    assert refused.value.field == "name"
    call(Dependency())
    status = breaker_force_open(name=NAME, actor="operator")
    assert (status.state, status.forced, status.remaining) == (OPEN, True, None)
    time.sleep(1.2)  # well past the reset timeout: a held breaker makes no trial call
    healthy = Dependency()
    with pytest.raises(CircuitOpen, match="held open"):
        call(healthy)
    assert healthy.calls == 0

    status = breaker_force_close(name=NAME, actor="operator")
    assert (status.state, status.forced, status.failures) == (CLOSED, False, 0)
    assert call(healthy) == "answer"


def test_breaker_states_lists_breakers_used_by_any_process(tight):
    open_breaker("http:elsewhere.example:443")
    # A process that never used it (this one, once its objects are gone) still lists it.
    breakers._BREAKERS.clear()
    states = {s.name: s for s in breaker_states()}
    elsewhere = states["http:elsewhere.example:443"]
    assert (elsewhere.state, elsewhere.failures, elsewhere.fail_max) == (OPEN, 3, 3)
    assert elsewhere.shared is True
    data = elsewhere.as_dict()
    assert set(data) == {
        "name",
        "state",
        "forced",
        "failures",
        "fail_max",
        "reset_timeout",
        "opened_at",
        "remaining",
        "shared",
    }
    json.dumps(data)


def test_without_redis_each_process_keeps_its_own_breakers(tight, settings):
    settings.REDIS_URL = ""
    open_breaker()
    status = breaker_get(name=NAME)
    assert (status.state, status.shared) == (OPEN, False)
    # A fresh object (another process) knows nothing of it.
    assert new_breaker(NAME).current_state == CLOSED
    wait_for_trial()
    assert call(Dependency()) == "answer"
    assert breaker_get(name=NAME).state == CLOSED


def test_the_breakers_command_lists_and_forces_breakers(tight, capsys):
    call(Dependency())
    call_command("breakers")
    out = capsys.readouterr().out
    assert NAME in out and CLOSED in out
    call_command("breakers", "--open", NAME)
    assert "held open" in capsys.readouterr().out
    call_command("breakers", "--json")
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["state"], listed["forced"]) == (NAME, OPEN, True)
    call_command("breakers", "--close", NAME)
    assert breaker_get(name=NAME).state == CLOSED
    with pytest.raises(CommandError, match="no circuit breaker"):
        call_command("breakers", "--close", "nope")


def test_a_breaker_nothing_has_used_yet_can_be_held_open_for_maintenance(tight, capsys):
    name = "http:maintenance.example:443"
    call_command("breakers", "--open", name)
    captured = capsys.readouterr()
    assert "has not been used yet" in captured.err
    assert name in captured.out and OPEN in captured.out
    healthy = Dependency()
    with pytest.raises(CircuitOpen, match="held open"):
        call(healthy, name=name)
    assert healthy.calls == 0
    call_command("breakers", "--close", name)
    assert call(healthy, name=name) == "answer"


def test_the_json_listing_is_an_empty_array_when_there_is_no_breaker():
    # A namespace of its own (AGENTS_REDIS_KEY_PREFIX) in which nothing was ever used.
    env = {**os.environ, "AGENTS_REDIS_KEY_PREFIX": f"empty-{uuid.uuid4().hex}"}
    done = subprocess.run(
        [sys.executable, "manage.py", "breakers", "--json"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.django_db
def test_an_open_breaker_answers_at_once_where_a_hanging_service_takes_its_timeout(
    tight, settings, flaky, user, loopback_allowed
):
    """The fail-fast figure: http.get against a hanging service, breaker closed vs open."""
    # Open for the whole test: a trial call after the reset timeout would reach the
    # service (50 fast failures can outlast one second on a loaded machine).
    settings.AGENTS = {**settings.AGENTS, "BREAKER_RESET_TIMEOUT": 60.0}
    flaky.set_mode(HANGING)
    run = ToolRun(task_id=uuid.uuid4(), owner_id=user.pk, step=1, events=[])
    get = [ToolCall("http.get", {"url": flaky.url("/slow"), "timeout": 0.5})]

    def timed() -> tuple[float, Exception]:
        started = time.perf_counter()
        try:
            tools_run(run, get)
        except Exception as exc:
            return (time.perf_counter() - started) * 1000, exc
        raise AssertionError("the call to a hanging service succeeded")

    closed = [timed() for _ in range(3)]
    opened = [timed() for _ in range(50)]
    assert [type(e) for _, e in closed] == [RetryableError, RetryableError, CircuitOpen]
    assert all(isinstance(e, CircuitOpen) for _, e in opened)
    assert len(flaky.requests_in(HANGING)) == 3, "calls with the breaker open reached the service"
    closed_ms = statistics.median(ms for ms, _ in closed)
    open_ms = statistics.median(ms for ms, _ in opened)
    print(
        f"\nhttp.get to a hanging service (timeout 0.5 s): breaker closed {closed_ms:.1f} ms "
        f"per call; breaker open {open_ms:.2f} ms per call (median of 50, max "
        f"{max(ms for ms, _ in opened):.2f} ms)"
    )
    breaker_events = [p for t, p in run.events if t == EventType.BREAKER]
    assert breaker_events == [
        {
            "breaker": f"http:127.0.0.1:{flaky.port}@owner:{user.pk}",
            "from": CLOSED,
            "to": OPEN,
            "failures": 3,
            "reason": "failure threshold reached",
        }
    ]


def start(user, *script):
    task, _ = task_start(owner=user, agent="scripted", input={"script": list(script)})
    return task


@pytest.mark.django_db(transaction=True)
def test_a_step_meeting_an_open_breaker_waits_without_spending_its_retries(
    tight, flaky, user, settings, loopback_allowed
):
    # One retry only: without the breaker these tasks would be dead-lettered at once.
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 1, "RETRY_BACKOFF": 0.05}
    flaky.set_mode(FAILING)
    get = {"tool": "http.get", "args": {"url": flaky.url("/data")}}
    tasks = [start(user, get, {"final": "done"}) for _ in range(4)]
    run_until_idle(max_messages=16)
    assert not DeadLetter.objects.exists()
    for task in AgentTask.objects.filter(pk__in=[t.pk for t in tasks]):
        assert task.status == TaskStatus.RUNNING
        assert task.attempt <= 1
    waits = AuditEvent.objects.filter(type=EventType.STEP_FAILED, payload__error_type="CircuitOpen")
    assert waits.count() >= 8
    assert all(0 <= e.payload["retry_in_seconds"] <= 1.0 for e in waits)

    flaky.set_mode(HEALTHY)
    run_until_idle()
    statuses = set(
        AgentTask.objects.filter(pk__in=[t.pk for t in tasks]).values_list("status", flat=True)
    )
    assert statuses == {TaskStatus.COMPLETED}
    transitions = [
        (e.payload["from"], e.payload["to"])
        for e in AuditEvent.objects.filter(type=EventType.BREAKER).order_by("created_at", "seq")
    ]
    assert (CLOSED, OPEN) in transitions
    assert transitions[-2:] == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


@pytest.mark.integration
def test_an_outage_opens_the_breaker_tasks_wait_and_all_complete_after_it(
    workers, user, flaky, settings, loopback_allowed
):
    """Twelve tasks on two worker processes (six slots) call a service that hangs."""
    fail_max = 3
    conf = {
        "AGENTS_BREAKER_FAIL_MAX": str(fail_max),
        "AGENTS_BREAKER_RESET_TIMEOUT": "2",
        # Two retries: a task that spent an attempt on every failed call would be
        # dead-lettered after its third.
        "AGENTS_MAX_RETRIES": "2",
        "AGENTS_RETRY_BACKOFF": "0.2",
        "AGENTS_RETRY_BACKOFF_MAX": "0.5",
        **loopback_allowed,
    }
    settings.AGENTS = {**settings.AGENTS, "BREAKER_FAIL_MAX": fail_max}
    flaky.set_mode(HANGING)
    for _ in range(2):
        workers.start(concurrency=3, **conf)
    get = {"tool": "http.get", "args": {"url": flaky.url("/data"), "timeout": 1}}
    ids = [start(user, get, {"final": "recovered"}).pk for _ in range(12)]
    # One owner: its own breaker opens, not the shared one (see test_tenant_breakers).
    name = f"http:127.0.0.1:{flaky.port}@owner:{user.pk}"
    failures = AuditEvent.objects.filter(task_id__in=ids, type=EventType.STEP_FAILED)

    def waits_per_task() -> dict[uuid.UUID, int]:
        counts = dict.fromkeys(ids, 0)
        for task_id in failures.filter(payload__error_type="CircuitOpen").values_list(
            "task_id", flat=True
        ):
            counts[task_id] += 1
        return counts

    wait_until(lambda: {s.name: s.state for s in breaker_states()}.get(name) == OPEN, timeout=60)
    # Every task meets the open breaker more often than its retry budget would allow.
    wait_until(lambda: min(waits_per_task().values()) >= 3, timeout=120, interval=0.5)
    tasks = list(AgentTask.objects.filter(pk__in=ids))
    assert {t.status for t in tasks} == {TaskStatus.RUNNING}
    assert not DeadLetter.objects.filter(task_id__in=ids).exists()
    # Only calls made before the breaker opened spent an attempt: fewer than fail_max.
    spent = failures.exclude(payload__error_type="CircuitOpen").count()
    assert spent <= fail_max - 1
    assert all(t.attempt <= 1 for t in tasks)

    results = AuditEvent.objects.filter(task_id__in=ids, type=EventType.TOOL_RESULT)
    timed_out = [
        e.payload["duration_ms"] for e in results.filter(payload__error_type="RetryableError")
    ]
    fast = [e.payload["duration_ms"] for e in results.filter(payload__error_type="CircuitOpen")]
    calls = len(timed_out) + len(fast)
    fast.sort()
    print(
        f"\n{calls} http.get calls while the service hung: {len(flaky.requests_in(HANGING))} "
        f"reached it. Breaker closed, timing out: median {statistics.median(timed_out or [0]):.0f}"
        f" ms per call; breaker open: median {statistics.median(fast):.2f} ms per call "
        f"(fastest {fast[0]:.2f}, slowest {fast[-1]:.2f}; the slow ones include the calls "
        "that opened the breaker)"
    )

    flaky.set_mode(HEALTHY)

    def all_done() -> bool:
        statuses = set(AgentTask.objects.filter(pk__in=ids).values_list("status", flat=True))
        return statuses <= {TaskStatus.COMPLETED, TaskStatus.DEAD_LETTERED, TaskStatus.FAILED}

    wait_until(all_done, timeout=120)
    assert set(AgentTask.objects.filter(pk__in=ids).values_list("result", flat=True)) == {
        "recovered"
    }
    assert not DeadLetter.objects.filter(task_id__in=ids).exists()
    assert breaker_get(name=name).state == CLOSED
    changes = {
        (e.payload["from"], e.payload["to"])
        for e in AuditEvent.objects.filter(task_id__in=ids, type=EventType.BREAKER)
    }
    assert {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)} <= changes
