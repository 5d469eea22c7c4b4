"""One step of an LLM agent (``llm.agent.LLMAgent``): it reads the checkpoint's state and
returns an outcome.

A step does one of:

- ask a person to approve a tool call the model made (``approve_tools``), with the tool
  and its arguments in the question; a rejection goes back to the model as that call's
  error result, with the comment, and the loop goes on; an edit runs the call with the
  person's arguments, and the conversation's assistant message then shows the edited
  call (``llm.services.message_tool_call_edit``), so the model sees the call that ran
  and its result; a respond gives the person's message to the model as the call's
  result, the tool not run;
- run the tool calls the model made, as the step's tool calls (idempotency keys
  ``task id : step : call index``); their results reach the model in the next step;
- otherwise: add the last tool results to the conversation, choose the messages the
  context policy keeps (``llm.context``), check the budgets (``llm.budget``), and make
  one chat-completions request (``llm.client``). A reply with tool calls leads to the
  above in the same step; a reply without ends the task with ``final_answer``.

Guarantees:

- **A model call is recorded and never paid for twice.** The response is stored under
  the call's key ``task id : step : model`` (``:summary`` for a summary, ``:2`` for a
  second try with a shrunk context) in its own transaction as soon as it arrives. A
  copy of the step that runs again (its worker died before the checkpoint committed)
  finds the record and uses it: the same tool calls, the same idempotency keys, no
  second bill. The audit event ``model_call`` says ``reused``.
- **Conversations cost O(1) per step to store.** A step writes only the messages it
  adds (``llm.models.Message``, numbered per task); the checkpoint holds the message
  count and a few counters, never the history.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from agents.definition import (
    CallTools,
    ChildSpec,
    Continue,
    Fail,
    Finish,
    HandOff,
    Outcome,
    StartChildren,
    StepContext,
    Suspend,
    ToolCall,
    get_agent,
)
from agents.errors import PermanentError, ToolArgumentError
from agents_project import tracing
from agents_project.errors import InvalidInput
from agents_project.validation import json_value_check
from audit.models import EventType
from llm import metrics, telemetry
from llm.budget import (
    ERROR_CODE,
    Budget,
    budget_check,
    budget_grant,
    owner_daily_check,
    usage_add,
)
from llm.client import (
    ChatReply,
    ContextTooLong,
    ModelConfig,
    ModelRefused,
    chat_complete,
    error_from_note,
    gateway_enabled,
    model_config,
    streamed_to,
)
from llm.context import (
    ChatMessage,
    ContextSettings,
    estimate_request_tokens,
    fold_point,
    latest_turns,
    summary_message,
    summary_request,
    well_formed,
)
from llm.delegation import agent_of, descendants_usage, is_agent_tool, tool_find
from llm.models import ModelCall
from llm.selectors import (
    conversation,
    conversation_pinned,
    conversation_tail,
    model_call_find,
    reply_from_record,
)
from llm.services import (
    message_tool_call_edit,
    messages_append,
    model_api_key,
    model_call_record,
)
from llm.streaming import delta_payload, delta_publish
from tools.registry import Tool

MCP_PREFIX = "mcp:"


class StepHooks(Protocol):
    """What a step asks of its agent (``llm.agent.LLMAgent`` has all of it)."""

    @property
    def name(self) -> str: ...

    def run_settings(self, input: Any) -> RunSettings: ...

    def mark(self, ctx: StepContext, message: ChatMessage) -> bool: ...

    def shape_messages(
        self, ctx: StepContext, messages: list[ChatMessage]
    ) -> list[ChatMessage]: ...

    def final_answer(self, ctx: StepContext, content: str) -> Any: ...


# The audit event of every model call. (audit.models.EventType lists the runtime's own
# types; this one is written by the llm app.)
MODEL_CALL = EventType.MODEL_CALL


@dataclass(frozen=True)
class RunSettings:
    """How one task of an LLM agent runs (from class attributes, or the input)."""

    system: str
    prompt: str
    model: str | None
    tools: tuple[str, ...]
    approve_tools: tuple[str, ...]
    max_steps: int
    budget: Budget
    on_budget: str
    context: ContextSettings
    # Stream the reply's text live (llm.streaming), where the model allows it.
    stream: bool = False


@dataclass(frozen=True)
class Reply:
    """Returned by ``final_answer``: the answer is not accepted; ``text`` goes to the
    model as a user message and the loop goes on."""

    text: str


def wire_name(name: str) -> str:
    """A tool's name as a function name servers accept (``^[a-zA-Z0-9_-]{1,64}$``).

    A built-in tool's other characters become ``_`` (``ledger.append`` ->
    ``ledger_append``). An MCP tool ``mcp:<server>/<tool>`` becomes
    ``mcp__<server>__<tool>`` (server names have no ``_``, so the first ``__`` after
    the prefix ends the server's); a tool name with other characters, or a result
    longer than 64, keeps a readable prefix and ends with ``_`` and 8 hex digits of
    the name's SHA-256, so two tools never share a wire name. The way back is the
    task's own tool list (``LLMStep._pending``), never parsing."""
    if not name.startswith(MCP_PREFIX):
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)
    server, _, tool = name[len(MCP_PREFIX) :].partition("/")
    wire = f"mcp__{server}__{tool}"
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", wire):
        return wire
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", wire)[:55]
    return f"{readable}_{digest}"


def tool_schema(tool: Tool) -> dict[str, Any]:
    """The chat-completions ``tools`` entry of ``tool``: its wire name, description and
    the JSON Schema of its arguments (an MCP tool's own ``inputSchema``)."""
    return {
        "type": "function",
        "function": {
            "name": wire_name(tool.name),
            "description": tool.description or tool.name,
            "parameters": tool.parameters_schema(),
        },
    }


class LLMStep:
    """One step of an LLM agent: reads the checkpoint's state, returns an outcome."""

    def __init__(self, agent: StepHooks, ctx: StepContext) -> None:
        self.agent = agent
        self.ctx = ctx
        self.settings = agent.run_settings(ctx.input)
        self.state: dict[str, Any] = json.loads(json.dumps(ctx.state))
        self.new: list[ChatMessage] = []
        limits = self.state.get("context_limits")
        self.limits = replace(self.settings.context, **limits) if limits else self.settings.context

    # --- the step ---------------------------------------------------------------------------

    def run(self) -> Outcome:
        if self.state["messages"] == 0:
            self._head()
        outcome = self._resolve_wait()
        if outcome is None:
            self._absorb_tool_results()
            outcome = self._tool_action() or self._model_turn()
        self._write()
        return outcome

    def _head(self) -> None:
        if self.settings.system:
            self._add(ChatMessage(role="system", content=self.settings.system, pinned=True))
        self._add(ChatMessage(role="user", content=self.settings.prompt, pinned=True))
        self.state["head"] = len(self.new)

    def _add(self, message: ChatMessage) -> None:
        if self.agent.mark(self.ctx, message):
            self.state["subtask"] += 1
        message.subtask = self.state["subtask"]
        self.new.append(message)

    def _write(self) -> None:
        first = self.state["messages"]
        messages_append(
            task_id=self.ctx.task_id, step=self.ctx.step, first_seq=first, messages=self.new
        )
        self.state["messages"] = first + len(self.new)
        self.new = []

    # --- waits: approvals of tool calls and of budgets ------------------------------------

    def _resolve_wait(self) -> Outcome | None:
        awaiting = self.state.get("awaiting")
        resumed = self.ctx.resumed
        if awaiting == "children" and resumed is not None and resumed.kind == "children":
            self._absorb_children(resumed.payload or [])
            return None
        if awaiting is None or resumed is None or resumed.kind not in ("approval", "timeout"):
            return None
        self.state["awaiting"] = None
        approved = bool(resumed.approved)
        if awaiting == "tool":
            call = next(c for c in self.state["pending"] if c["status"] == "approve")
            if resumed.decision == "edit" and resumed.args is not None:
                # The model sees the call as the person edited it, and that call's result.
                call["args"] = resumed.args
                message_tool_call_edit(
                    task_id=self.ctx.task_id, call_id=call["id"], args=resumed.args
                )
            if resumed.decision == "respond":
                call["status"] = "done"
                call["result"] = resumed.message
            elif approved:
                call["status"] = "run"
            else:
                who = f" by {resumed.decided_by}" if resumed.decided_by else ""
                comment = f": {resumed.comment}" if resumed.comment else ""
                call["status"] = "done"
                call["result"] = f"error: this call was rejected{who}{comment}"
            return None
        if not approved:
            return Fail(
                error=f"{ERROR_CODE}: continuing past the budget was rejected", state=self.state
            )
        if awaiting == "budget":
            # What the question offered (a suspension from before offers were recorded:
            # one more budget of the same size).
            offered = self.state.get("budget_offer")
            self.state["budget_offer"] = None
            grant = Budget.from_input(offered) if offered else self.settings.budget
            self.state["budget_limit"] = self._budget_limit().plus(grant).as_state()
            self.state["budget_grants"] += 1
        else:
            self.state["owner_grant_day"] = _today()
        return None

    def _absorb_children(self, children: list[dict[str, Any]]) -> None:
        """The delegated calls' results from their children (in the order they were
        started), and the children's model spend added to this task's usage."""
        self.state["awaiting"] = None
        delegated = [c for c in self.state["pending"] or () if c["status"] == "delegated"]
        for call, child in zip(delegated, children, strict=False):
            call["status"] = "done"
            if child["status"] == "completed":
                value = child["result"]
                call["result"] = value if isinstance(value, str) else json.dumps(value)
            else:
                call["result"] = (
                    f"error: the {call['name']} task {child['task']} ended {child['status']}"
                    + (f": {child['error']}" if child["error"] else "")
                )
        spent = descendants_usage(task_ids=[child["task"] for child in children])
        usage = self.state["usage"]
        self.state["usage"] = {
            **{key: usage[key] + spent[key] for key in usage if key != "cost"},
            "cost": str(Decimal(usage["cost"]) + Decimal(str(spent["cost"]))),
        }

    def _absorb_tool_results(self) -> None:
        pending = self.state.get("pending") or []
        running = [c for c in pending if c["status"] == "running"]
        results = list(self.ctx.tool_results)
        for index, call in enumerate(running):
            call["status"] = "done"
            if index >= len(results):
                call["result"] = "error: no result"
                continue
            result = results[index]
            if result.ok:
                value = result.value
                call["result"] = value if isinstance(value, str) else json.dumps(value)
            else:
                call["result"] = f"error: {result.error}"

    def _tool_action(self) -> Outcome | None:
        """Ask for the next approval, or run the approved calls; None when every call of
        the last reply has its result (they are then added to the conversation)."""
        pending = self.state.get("pending")
        if not pending:
            return None
        waiting = next((c for c in pending if c["status"] == "approve"), None)
        if waiting is not None:
            self.state["awaiting"] = "tool"
            args = json.dumps(waiting["args"], sort_keys=True)
            return Suspend(
                state=self.state,
                approval=f"Run tool {waiting['name']} with arguments {args}?",
                tool_call=ToolCall(waiting["name"], waiting["args"]),
                on_reject="continue",
                reasoning=f"tool {waiting['name']} needs a person's approval",
            )
        runnable = [c for c in pending if c["status"] == "run" and not is_agent_tool(c["name"])]
        if runnable:
            for call in runnable:
                call["status"] = "running"
            return CallTools([ToolCall(c["name"], c["args"]) for c in runnable], state=self.state)
        delegated = [c for c in pending if c["status"] == "run"]
        if delegated:
            # Agent tools (``llm.delegation``): child tasks, joined once all have ended.
            for call in delegated:
                call["status"] = "delegated"
            self.state["awaiting"] = "children"
            return StartChildren(
                [ChildSpec(agent_of(c["name"]), c["args"]["input"]) for c in delegated],
                join="all",
                on_child_failure="report",
                state=self.state,
                reasoning=f"delegated to {', '.join(c['name'] for c in delegated)}",
            )
        for call in pending:
            self._add(
                ChatMessage(
                    role="tool",
                    content=str(call["result"]),
                    tool_call_id=call["id"],
                    name=call["name"],
                )
            )
        self.state["pending"] = None
        return None

    # --- the model ----------------------------------------------------------------------------

    def _model_turn(self) -> Outcome:
        if self.state["turns"] >= self.settings.max_steps:
            return Fail(
                error=f"max_steps_exceeded: {self.state['turns']} model turns without a final "
                f"answer (max_steps {self.settings.max_steps})",
                state=self.state,
            )
        if self.ctx.handed_back is not None:
            # This step ran before on this delivery's behalf and handed off its request,
            # planned from these same messages, which it stored first: not again.
            self.state["messages"] += len(self.new)
            self.new = []
        else:
            self._write()  # the request is built from storage, these included
        config = self._model()
        outcome = self._reply(config)
        if not isinstance(outcome, tuple):
            return outcome
        reply, record = outcome
        self.state["turns"] += 1
        assistant = ChatMessage(
            role="assistant",
            content=reply.content,
            tool_calls=reply.tool_calls or None,
            model_call_id=record.pk,
        )
        self._add(assistant)
        if reply.tool_calls:
            self.state["pending"] = [self._pending(i, c) for i, c in enumerate(reply.tool_calls)]
            return self._tool_action() or Continue(state=self.state)
        result = self.agent.final_answer(self.ctx, reply.content)
        if isinstance(result, Reply):
            self._add(ChatMessage(role="user", content=result.text))
            return Continue(state=self.state)
        return Finish(result=result, state=self.state)

    def _pending(self, index: int, call: dict[str, Any]) -> dict[str, Any]:
        """A tool call of the reply: to approve, to run, or already answered with an
        error (a tool the task does not allow, arguments that do not fit)."""
        wire = call["function"]["name"]
        allowed = {wire_name(n): n for n in self.settings.tools}
        name = allowed.get(wire) or (wire if wire in self.settings.tools else None)
        entry: dict[str, Any] = {"id": call.get("id") or f"call_{self.ctx.step}_{index}"}
        entry.update(name=name or wire, args={}, status="done")
        tool = tool_find(name, owner_id=self.ctx.owner_id) if name else None
        if tool is None:
            entry["result"] = f"error: no tool {wire!r}; the tools are {sorted(allowed)}"
            return entry
        try:
            args = json.loads(call["function"]["arguments"] or "{}")
            entry["args"] = tool.validate(args)
        except ValueError as exc:
            entry["result"] = f"error: the arguments are not JSON: {exc}"
            return entry
        except ToolArgumentError as exc:
            entry["result"] = f"error: {exc}"
            return entry
        if is_agent_tool(tool.name):
            try:
                child = get_agent(agent_of(tool.name))
                json_value_check(entry["args"]["input"], field="input")
                child.validate_input(entry["args"]["input"])
            except InvalidInput as exc:
                entry["result"] = f"error: {exc.field}: {exc.message}"
                return entry
        # Asked for by the task, or by the tool itself (an MCP tool marked destructive).
        approve = name in self.settings.approve_tools or tool.needs_approval
        entry["status"] = "approve" if approve else "run"
        return entry

    def _reply(self, config: ModelConfig) -> tuple[ChatReply, ModelCall] | Outcome:
        owner = self.ctx.owner_id
        tools = [tool_schema(t) for n in self.settings.tools if (t := tool_find(n, owner_id=owner))]
        base = f"{self.ctx.task_id}:{self.ctx.step}"
        limits = self.limits
        for attempt in (1, 2):
            suffix = "" if attempt == 1 else f":{attempt}"
            key = f"{base}:model{suffix}"
            replayed = self._replayed(key)
            if replayed is not None:
                return replayed
            messages, fold = self._plan(limits, suffix)
            record = None if self._unrecorded() else model_call_find(key=key)
            folded = model_call_find(key=fold[0]) if fold else None
            if record is None:
                calls = 1 + (1 if fold and folded is None else 0)
                tokens = estimate_request_tokens(messages, tools)
                if fold:
                    tokens += estimate_request_tokens(fold[1])
                refusal = self._over_budget(config, calls, tokens)
                if refusal is not None:
                    return refusal
            try:
                if fold:
                    messages = self._summarized(config, fold, folded, messages)
                messages = well_formed(self.agent.shape_messages(self.ctx, messages))
                return self._call(key, record, ModelCall.Purpose.REPLY, config, messages, tools)
            except ContextTooLong:
                sent = estimate_request_tokens(messages, tools)
                shrunk = limits.shrunk(sent, len(messages))
                if attempt == 2 or shrunk is None:
                    raise
                limits = shrunk
                self.state["context_limits"] = {
                    "max_messages": shrunk.max_messages,
                    "max_tokens": shrunk.max_tokens,
                    "keep_last": shrunk.keep_last,
                }
        raise AssertionError("unreachable")

    def _replayed(self, key: str) -> tuple[ChatReply, ModelCall] | None:
        """The reply the model gateway recorded for ``key`` on this delivery, taken
        without planning the request again: the hand-off's payload said what the plan
        sent (``messages_sent``, ``estimated_tokens``), and nothing else of the plan is
        needed once the reply is recorded. Not for the ``summarize`` policy, whose plan
        also notes the summary it folded in (``state["summary"]``)."""
        handed = self._handed_back(key)
        if (
            handed is None
            or not handed.get("recorded")
            or "messages_sent" not in handed
            or self.limits.policy == "summarize"
        ):
            return None
        record = model_call_find(key=key)
        if record is None:
            return None
        return self._use(
            key,
            record,
            ModelCall.Purpose.REPLY,
            handed,
            sent=int(handed["messages_sent"]),
            estimated=int(handed["estimated_tokens"]),
        )

    def _call(
        self,
        key: str,
        record: ModelCall | None,
        purpose: str,
        config: ModelConfig,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]],
    ) -> tuple[ChatReply, ModelCall]:
        """The reply recorded under ``key`` (``record``, as the caller found it), asking
        the model only if there is none."""
        reused = record is not None
        handed = self._handed_back(key)
        if handed is not None:
            if handed.get("error"):
                for payload in handed.get("breaker", ()):
                    self.ctx.audit(EventType.BREAKER, payload)
                raise error_from_note(handed["error"])
            # Recorded by the model gateway for this delivery: a new call, not a reuse.
            reused = reused and not handed.get("recorded")
        if record is None and gateway_enabled():
            raise HandOff(
                {
                    "key": key,
                    "purpose": purpose,
                    "model": config.name,
                    "messages": [m.wire() for m in messages],
                    "tools": tools,
                    "estimated_tokens": estimate_request_tokens(messages, tools),
                    "owner_id": self.ctx.owner_id,
                    "agent": self.agent.name,
                    "stream": self._streams(config),
                }
            )
        if record is None:
            transitions: list[Any] = []
            streaming = streamed_to(self._delta_sink(key)) if self._streams(config) else None
            wire = [m.wire() for m in messages]
            api_key = self._api_key(config)
            try:
                with (
                    streaming or contextlib.nullcontext(),
                    telemetry.chat_span(model=config.name, base_url=config.base_url, key=key),
                ):
                    secrets = self._content_secrets(api_key)
                    telemetry.chat_request_record(wire, secrets=secrets)
                    reply = chat_complete(
                        config=config,
                        messages=wire,
                        tools=tools,
                        api_key=api_key,
                        headers={"X-Agents-Call": key},
                        estimated_tokens=estimate_request_tokens(messages, tools),
                        transitions=transitions,
                    )
                    telemetry.chat_reply_record(reply, model=config.name, secrets=secrets)
            finally:
                for transition in transitions:
                    self.ctx.audit(EventType.BREAKER, transition.as_payload())
            record, created = model_call_record(
                task_id=self.ctx.task_id,
                owner_id=self.ctx.owner_id,
                step=self.ctx.step,
                key=key,
                purpose=purpose,
                config=config,
                reply=reply,
            )
            reused = not created
            if created:
                metrics.model_call_observed(
                    agent=self.agent.name,
                    model=config.name,
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    duration_ms=reply.duration_ms,
                    cost=record.cost,
                )
        elif reused:
            telemetry.chat_reused(
                model=config.name,
                key=key,
                response_model=record.model,
                finish_reason=record.finish_reason,
            )
        return self._use(
            key,
            record,
            purpose,
            handed,
            reused=reused,
            sent=len(messages),
            estimated=estimate_request_tokens(messages, tools),
        )

    def _use(
        self,
        key: str,
        record: ModelCall,
        purpose: str,
        handed: Mapping[str, Any] | None,
        *,
        sent: int,
        estimated: int,
        reused: bool = False,
    ) -> tuple[ChatReply, ModelCall]:
        """Account for the reply recorded under ``key``: the calibration of the next
        budget check, the task's usage, and the ``model_call`` audit event. ``sent``:
        messages in the request; ``estimated``: its estimated prompt tokens."""
        if handed is not None:
            for payload in handed.get("breaker", ()):
                self.ctx.audit(EventType.BREAKER, payload)
        reply = reply_from_record(record)
        if purpose == ModelCall.Purpose.REPLY and not record.usage_estimated:
            # How the provider counts against the estimate, and how long its replies
            # run: the next budget check uses both (see _over_budget).
            self.state["calibration"] = {
                "ratio": record.prompt_tokens / max(estimated, 1),
                "completion": record.completion_tokens,
            }
        self.state["usage"] = usage_add(
            self.state["usage"],
            prompt=record.prompt_tokens,
            completion=record.completion_tokens,
            total=record.total_tokens,
            cost=Decimal(record.cost),
        )
        self.ctx.audit(
            MODEL_CALL,
            {
                "model": record.model,
                "key": key,
                "purpose": purpose,
                "usage": {
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "total_tokens": record.total_tokens,
                },
                "usage_estimated": record.usage_estimated,
                "cost": float(record.cost),
                "duration_ms": record.duration_ms,
                "finish_reason": record.finish_reason,
                "reused": reused,
                "messages_sent": sent,
                "content": reply.content,
                "tool_calls": reply.tool_calls,
            },
        )
        return reply, record

    def _content_secrets(self, api_key: str) -> tuple[str, ...]:
        """What a span's captured content must not show (read only when captured)."""
        if not tracing.capture_content():
            return ()
        return telemetry.content_secrets(
            task_id=self.ctx.task_id, owner_id=self.ctx.owner_id, api_key=api_key
        )

    def _streams(self, config: ModelConfig) -> bool:
        """Whether this task's replies stream (its input asks; the model allows it)."""
        return self.settings.stream and config.stream

    def _delta_sink(self, key: str) -> Callable[[str], None]:
        """Where a streamed reply's text goes: ``llm.streaming.delta_publish``."""
        index = itertools.count()

        def sink(text: str) -> None:
            message = delta_payload(key=key, step=self.ctx.step, index=next(index), delta=text)
            delta_publish(task_id=self.ctx.task_id, message=message)

        return sink

    def _unrecorded(self) -> bool:
        """True when no reply can be recorded for this step's request yet, so there is
        nothing to look up: with the model gateway on, a reply is recorded only for a
        request handed off, and a hand-off commits its step as the task's current one,
        so a step that follows another in the same delivery has never been handed off.
        (The gateway looks the key up again before it calls, so even a reply recorded
        by a pool process before the gateway was turned on is never paid for twice.)"""
        return self.ctx.continued and gateway_enabled()

    def _handed_back(self, key: str) -> Mapping[str, Any] | None:
        """What the model gateway said of the call ``key`` on this delivery, if anything."""
        handed = self.ctx.handed_back
        return handed if handed is not None and handed.get("key") == key else None

    def _model(self) -> ModelConfig:
        """The task's model, refused (``PermanentError`` naming the field) when it is not
        on the allow-list, or has no price and a cost budget applies: the settings may
        have changed since the task was accepted."""
        try:
            return model_config(
                self.settings.model, need_price=self.settings.budget.cost is not None
            )
        except ModelRefused as exc:
            model = self.settings.model
            named = (
                model is not None
                and isinstance(self.ctx.input, dict)
                and self.ctx.input.get("model") == model
            )
            raise PermanentError(f"{'input.model' if named else 'model'}: {exc}") from None

    def _api_key(self, config: ModelConfig) -> str:
        return model_api_key(config=config, task_id=self.ctx.task_id, owner_id=self.ctx.owner_id)

    def _budget_limit(self) -> Budget:
        """The task's budget plus every grant approved so far (``budget_limit`` in the
        state; a state from before it was recorded granted one budget per approval)."""
        limit = self.state.get("budget_limit")
        if limit is not None:
            return Budget.from_input(limit)
        return self.settings.budget.times(1 + self.state["budget_grants"])

    def _over_budget(self, config: ModelConfig, calls: int, tokens: int) -> Outcome | None:
        """Fail or suspend if the next call(s) would pass a budget. The call is counted
        as ``tokens`` (the estimate of its prompt) scaled by how the provider counted the
        last request against its estimate, plus as many completion tokens as the last
        reply had: a bill can still pass the budget by what that guess misses."""
        budget = self._budget_limit()
        completion = 0
        calibration = self.state.get("calibration")
        if calibration:
            tokens = math.ceil(tokens * calibration["ratio"])
            completion = calibration["completion"]
        reason = budget_check(
            budget=budget,
            usage=self.state["usage"],
            calls=calls,
            tokens=tokens + completion,
            cost=config.cost(tokens, completion),
        )
        tokens += completion
        awaiting = "budget"
        if reason is None and self.state.get("owner_grant_day") != _today():
            reason = owner_daily_check(owner_id=self.ctx.owner_id, tokens=tokens)
            awaiting = "owner_budget"
        if reason is None:
            return None
        if self.settings.on_budget == "approval":
            self.state["awaiting"] = awaiting
            if awaiting == "budget":
                # At least what this call needs: an approval always lets it go out.
                offer = budget_grant(
                    budget=self.settings.budget,
                    limit=budget,
                    usage=self.state["usage"],
                    calls=calls,
                    tokens=tokens,
                    cost=config.cost(tokens - completion, completion),
                )
                self.state["budget_offer"] = offer.as_state()
                grant = f"{offer.describe()} for this task"
            else:
                grant = "this task going past the daily budget for the rest of today (UTC)"
            return Suspend(
                state=self.state,
                approval=f"Budget: {reason}. Approve {grant}?",
                on_reject="continue",
                reasoning=f"{ERROR_CODE}: {reason}",
            )
        return Fail(error=f"{ERROR_CODE}: {reason}", state=self.state)

    # --- context policies -----------------------------------------------------------------------

    def _plan(
        self, limits: ContextSettings, suffix: str
    ) -> tuple[list[ChatMessage], tuple[str, list[ChatMessage], int] | None]:
        """The messages the policy sends, and for ``summarize`` a fold to make first:
        ``(summary key, summary request, the seq after the folded messages)``."""
        task_id, end, head = self.ctx.task_id, self.state["messages"], self.state["head"]
        policy = limits.policy
        if policy == "full":
            return conversation(task_id=task_id, end=end), None
        heads = conversation(task_id=task_id, end=head)
        if policy == "rolling":
            # The system prompt stays; the original prompt is a turn like any other.
            system = [m for m in heads if m.role == "system"]
            return system + self._latest(limits, system, start=len(system), end=end), None
        if policy == "select":
            pinned = conversation_pinned(task_id=task_id, start=head, end=end)
            kept = heads + pinned
            current = self._latest(limits, kept, start=head, end=end, subtask=True)
            by_seq = {m.seq or 0: m for m in kept + current}  # stored: seq is set
            return [by_seq[s] for s in sorted(by_seq)], None
        return self._plan_summarize(limits, heads, end, suffix)

    def _latest(
        self,
        limits: ContextSettings,
        before: list[ChatMessage],
        *,
        start: int,
        end: int,
        subtask: bool = False,
    ) -> list[ChatMessage]:
        room = None if limits.max_messages is None else max(limits.max_messages - len(before), 1)
        tail = conversation_tail(
            task_id=self.ctx.task_id,
            start=start,
            end=end,
            max_messages=room,
            max_tokens=limits.max_tokens,
            subtask=self.state["subtask"] if subtask else None,
        )
        return latest_turns(
            tail,
            max_messages=room,
            max_tokens=limits.max_tokens,
            reserved_tokens=sum(m.tokens for m in before),
        )

    def _plan_summarize(
        self, limits: ContextSettings, heads: list[ChatMessage], end: int, suffix: str
    ) -> tuple[list[ChatMessage], tuple[str, list[ChatMessage], int] | None]:
        summary = self.state.get("summary")
        upto = summary["upto"] if summary else self.state["head"]
        previous = _summary_text(summary["call"]) if summary else None
        base = heads + ([summary_message(previous)] if previous else [])
        since = conversation(task_id=self.ctx.task_id, start=upto, end=end)
        if not limits.over(base + since):
            return base + since, None
        cut = fold_point(since, limits.keep_last)
        if cut == 0:
            return base + since, None
        key = f"{self.ctx.task_id}:{self.ctx.step}:summary{suffix}"
        upto = since[cut].seq or 0  # stored messages all have their seq
        return heads + since[cut:], (key, summary_request(previous, since[:cut]), upto)

    def _summarized(
        self,
        config: ModelConfig,
        fold: tuple[str, list[ChatMessage], int],
        folded: ModelCall | None,
        messages: list[ChatMessage],
    ) -> list[ChatMessage]:
        key, request, upto = fold
        reply, record = self._call(key, folded, ModelCall.Purpose.SUMMARY, config, request, [])
        self.state["summary"] = {"call": record.pk, "upto": upto}
        head = self.state["head"]
        heads = [m for m in messages if m.seq is not None and m.seq < head]
        rest = [m for m in messages if m.seq is None or m.seq >= head]
        return heads + [summary_message(reply.content)] + rest


def _summary_text(call_id: int) -> str:
    record = ModelCall.objects.get(pk=call_id)
    return reply_from_record(record).content


def _today() -> str:
    return datetime.now(UTC).date().isoformat()
