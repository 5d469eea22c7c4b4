"""The public API for defining agents.

An agent is a class with a ``name``, a ``version``, the schema version of its state
(with migrations from older versions), and a ``step`` method. The runtime calls
``step`` once per step with a :class:`StepContext` (the state from the last checkpoint
and what the last step caused) and the agent returns what happened, one of:

- :class:`Continue` -- go on with a new state;
- :class:`CallTools` -- run these tools now; their results reach the next step;
- :class:`Suspend` -- wait for a person's approval, a named event, or a time;
- :class:`StartChildren` -- start child tasks and wait, holding no worker, until all,
  any or N of them complete (``agents.core.children``);
- :class:`Finish` -- the task is complete, with this result;
- :class:`Fail` -- the task has failed, with this error.

Every outcome may carry ``reasoning``: text the audit trail keeps as a reasoning step.
A step may also raise (see ``agents.errors``): retryable errors are retried with
backoff, permanent ones fail the task. State must be JSON-serialisable.

``step`` may run more than once for the same step number (a worker died before the
checkpoint committed); only one run's outcome is kept. Side effects belong in tools,
which receive an idempotency key, not in ``step`` itself.

Example::

    from agents.definition import (
        Agent, CallTools, Finish, StepContext, ToolCall, register,
    )

    @register
    class Greeter(Agent):
        name = "greeter"
        version = "1.0"

        def initial_state(self, input):
            return {"name": input["name"], "greeted": False}

        def step(self, ctx: StepContext):
            if not ctx.state["greeted"]:
                call = ToolCall("ledger.append", {"key": "greeting", "value": ctx.state["name"]})
                return CallTools([call], state={**ctx.state, "greeted": True},
                                 reasoning="record the greeting once")
            return Finish(result=f"hello {ctx.state['name']}")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal
from uuid import UUID

from agents_project.errors import InvalidInput
from tools.registry import ToolCall, ToolResult

State = Any
Migration = Callable[[State], State]
OnTimeout = Literal["fail", "reject", "continue"]


@dataclass(frozen=True)
class Resumption:
    """How the wait of a suspended task ended, seen by the step after it.

    ``kind`` is ``approval`` (``approved`` says the decision), ``event`` (``payload``
    is the signal's), ``timer``, ``timeout`` (the wait's own timeout passed and its
    policy was ``continue``; ``payload`` is the default given with the wait), or
    ``children`` (the join of a ``StartChildren`` held: ``payload`` is the children in
    the order they were started, each ``{"task", "agent", "status", "result",
    "error", "ended"}``, ``ended`` the order in which they ended, from 1, or None for
    a child still live; ``results`` what the join yields, see ``StartChildren``).

    For the approval of a tool call (``Suspend.tool_call``), ``decision`` is one of
    ``approve``, ``edit`` (run the call with ``args``, validated against the tool's
    schema), ``respond`` (do not run it: ``message`` is its result) or ``reject``;
    ``approved`` is True for ``approve`` and ``edit``.
    """

    kind: str
    approved: bool | None = None
    payload: Any = None
    comment: str = ""
    decided_by: str = ""
    decision: str = ""
    args: dict[str, Any] | None = None
    message: str = ""

    @property
    def results(self) -> list[Any]:
        """For ``children``: the results of the children that completed, in the order
        they were started."""
        return [c["result"] for c in self.payload or () if c["status"] == "completed"]


@dataclass(frozen=True)
class StepContext:
    """What a step knows: its task and the task's owner (a user id), its number, its
    attempt, the task's input, the state of the last checkpoint, and what the last step
    caused (``tool_results``, ``resumed``).

    ``audit(type, payload)`` adds an event to the step's audit trail; the events are
    written with the step's outcome, whatever it is (committed, retried or failed).
    """

    task_id: UUID
    step: int
    attempt: int
    input: Any
    state: State
    owner_id: int
    tool_results: tuple[ToolResult, ...] = ()
    resumed: Resumption | None = None
    # What the process a step was handed to says of it (``HandOff``): ``{"key": ...,
    # "error": {...}}`` or ``{"key": ..., "recorded": true}``; None on a plain delivery.
    handed_back: Mapping[str, Any] | None = None
    # True for a step that follows another in the same delivery (the engine ran the one
    # before it in this process, ``steps_per_delivery``); False for a delivery's first.
    continued: bool = False
    # The step's audit events as ``(type, payload)`` pairs; the engine passes its own list.
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list, compare=False)

    def audit(self, event_type: str, payload: dict[str, Any]) -> None:
        """Record ``event_type`` with ``payload`` (JSON) in this step's audit trail."""
        self.events.append((event_type, payload))


class HandOff(Exception):  # noqa: N818 (a control-flow signal, like StopIteration)
    """Raised by a step to give its wait to another process: the step ends without a
    checkpoint, its lease passes to that process, and the pool process is free.

    ``payload`` (JSON) is published, with the task id, step and fencing token, to the
    hand-off queue (``AGENTS_HANDOFF_QUEUE``); the process that takes it (the model
    gateway, ``manage.py llm_gateway``) does the waiting and then publishes the same
    step again, with what it learned in ``StepContext.handed_back``. The step runs
    again from its checkpoint, so it must find what was done (a recorded reply) and
    not hand the same thing off twice.
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("key", "hand-off"))
        self.payload = payload


@dataclass(frozen=True)
class Continue:
    state: State
    reasoning: str | None = None


@dataclass(frozen=True)
class CallTools:
    calls: Sequence[ToolCall]
    state: State
    reasoning: str | None = None


@dataclass(frozen=True)
class Suspend:
    """Stop and hold no worker until one of: an approval, an event, a time.

    Give exactly one of ``approval`` (the question for a person), ``event`` (the signal
    name to wait for) or ``until`` (an aware datetime). ``timeout`` (seconds) bounds an
    approval or event wait; when it passes, ``on_timeout`` applies: ``fail`` ends the
    task failed, ``reject`` resumes as if rejected, ``continue`` resumes with
    ``default`` as the payload. A rejected approval ends the task failed unless
    ``on_reject`` is ``continue``: then the next step sees ``resumed.approved`` False.

    ``tool_call``: the call an approval is about. Only then may a person edit its
    arguments or answer it instead of running it (``Resumption.decision``); the agent
    must honour ``resumed.args`` and ``resumed.message``.
    """

    state: State
    approval: str | None = None
    event: str | None = None
    until: datetime | None = None
    timeout: float | None = None
    on_timeout: OnTimeout = "fail"
    on_reject: Literal["fail", "continue"] = "fail"
    default: Any = None
    reasoning: str | None = None
    tool_call: ToolCall | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.approval, self.event, self.until) if x is not None]
        if len(given) != 1:
            raise ValueError("Suspend needs exactly one of approval, event or until")


@dataclass(frozen=True)
class ChildSpec:
    """A child task to start: an agent's name and its input (checked as ``task_start``
    checks one)."""

    agent: str
    input: Any


Join = Literal["all", "any"] | int


@dataclass(frozen=True)
class StartChildren:
    """Start ``children`` (1 to 1000) as tasks of the same owner, and suspend, holding
    no worker, until ``join`` of them have completed: ``"all"``, ``"any"`` (one) or a
    number N. The next step sees ``ctx.resumed`` of kind ``children``.

    Started in the step's commit, each with an id derived from (this task, this step,
    its index), so a step that runs again never starts a child twice. A child that ends
    without completing (failed, cancelled, timed out) fails the join as soon as the
    join can no longer hold (for ``all``, at the first one): the task ends ``failed``
    with that child's error; with ``on_child_failure="report"`` it counts as ended
    instead (the join waits for ``join`` children to end, however) and the next step
    reads each one's status and error in ``ctx.resumed.payload``. When the join holds,
    children still live are cancelled; so are they when this task ends in any way. A
    child's deadline is its parent's.
    """

    children: Sequence[ChildSpec]
    join: Join = "all"
    state: State = None
    reasoning: str | None = None
    on_child_failure: Literal["fail", "report"] = "fail"

    def __post_init__(self) -> None:
        if not self.children:
            raise ValueError("StartChildren needs at least one child")

    @property
    def join_count(self) -> int:
        """How many children must complete."""
        if self.join == "all":
            return len(self.children)
        if self.join == "any":
            return 1
        return int(self.join)


@dataclass(frozen=True)
class Finish:
    result: Any
    state: State = None
    reasoning: str | None = None


@dataclass(frozen=True)
class Fail:
    error: str
    state: State = None
    reasoning: str | None = None


Outcome = Continue | CallTools | Suspend | StartChildren | Finish | Fail


class Agent:
    """Base class of agent definitions. Subclass, set ``name``, implement ``step``.

    Class attributes a subclass may set:

    - ``version``: the code's version, recorded on each task it starts. A task runs to
      its end on workers whose code has that version (``agents.core.versions``); a
      worker of another version refuses its steps, which wait for one that serves it.
    - ``compatible_versions``: older versions whose tasks this code may take over
      (declare one only when ``migrations`` cover its state schema and the step logic
      accepts its states). A task taken over is pinned to this version from then on.
    - ``state_version`` and ``migrations``: the schema version of the state this code
      reads and writes, and for each older version N the function that turns a state
      of version N into version N + 1. A checkpoint written by older code is migrated
      in order when it is loaded; one written by newer code is never touched.
    - ``max_retries``, ``step_time_limit``, ``step_soft_time_limit``: override the
      runtime's defaults (``settings.AGENTS``) for this agent.
    - ``learned_limits``: take the step time limit (and the default task deadline) that
      ``python manage.py suggest_timeouts --apply`` computed from this agent's history;
      an explicit ``step_time_limit`` still wins.
    - ``steps_per_delivery`` and ``commit_every``, the checkpoint policy. By default each
      step is one delivery and one commit. An agent whose steps are cheap may let up to
      ``steps_per_delivery`` consecutive steps run in one delivery (a step that calls
      tools, suspends or ends the task ends the run; with ``continue_after_tools`` a
      step that calls tools does not), committing their checkpoints (one per step, as
      always) every ``commit_every`` steps, each group in one transaction. The
      trade-off: after a crash, the steps since the last commit run again (their tool
      calls keep their idempotency keys).
      ``AGENTS_CHECKPOINT_POLICY`` overrides both per agent name.
    - ``tool_errors_to_agent``: a tool's permanent error (bad arguments, a refused
      request) becomes that call's failed ``ToolResult`` for the next step, instead of
      failing the task (LLM agents show it to the model).
    - ``max_running_per_owner``: at most this many tasks of this agent per owner are
      admitted (``pending`` with a message, or ``running``) at once; more wait, without
      a broker message, for admission (``agents.core.admission``). None: only
      ``AGENTS_OWNER_MAX_RUNNING`` applies. 0: no per-agent limit.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    compatible_versions: ClassVar[Sequence[str]] = ()
    state_version: ClassVar[int] = 1
    migrations: ClassVar[Mapping[int, Migration]] = {}
    max_retries: ClassVar[int | None] = None
    step_time_limit: ClassVar[float | None] = None
    step_soft_time_limit: ClassVar[float | None] = None
    learned_limits: ClassVar[bool] = False
    steps_per_delivery: ClassVar[int] = 1
    commit_every: ClassVar[int] = 1
    continue_after_tools: ClassVar[bool] = False
    tool_errors_to_agent: ClassVar[bool] = False
    max_running_per_owner: ClassVar[int | None] = None

    def runs_version(self, version: str) -> bool:
        """True if this code may run steps of a task started on agent ``version``: its
        own version, or one it declares compatible."""
        return version == self.version or version in self.compatible_versions

    def validate_input(self, input: Any) -> None:
        """Refuse input this agent can never run, with ``InvalidInput(field=...)``."""

    def initial_state(self, input: Any) -> State:
        return {}

    def step(self, ctx: StepContext) -> Outcome:
        raise NotImplementedError


_REGISTRY: dict[str, Agent] = {}


def register(cls: type[Agent]) -> type[Agent]:
    """Class decorator: make the agent available by its ``name``."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__} needs a name")
    missing = [v for v in range(1, cls.state_version) if v not in cls.migrations]
    if missing:
        raise TypeError(f"{cls.__name__} has no migration from state version(s) {missing}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_agent(name: str) -> Agent:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown agent {name!r}", field="agent") from None


def registered_agents() -> Mapping[str, Agent]:
    return dict(_REGISTRY)
