"""The zero-setup demo: a real worker process, an embedded broker, a SQLite file.

It starts one Celery worker, runs a multi-step ``scripted`` agent (reasoning, a
calculation, a manager's approval that the demo grants, a side effect recorded once,
an answer), follows it live, and prints its audit timeline. Interrupt it at any point
and run it again: it finds the unfinished task and resumes it from its last checkpoint.

With ``llm=True`` (``bin/demo --llm``) it runs the built-in ``llm`` agent on the same
refund instead: against the model server in ``AGENTS_LLM_BASE_URL`` if that is set,
else against a small SCRIPTED chat-completions server the demo starts on loopback
(``llm.testing.chat_server``; no language model is involved, and the output says so).

Its output is the story of the task only: the demo process's own log lines go to
``var/demo.log`` (the worker's to ``var/demo-worker.log``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command

from agents.core.scheduler import stuck_tasks_republish
from agents.core.state_machine import FINAL
from agents.core.suspensions import task_approve
from agents.models import ACTIVE_STATUSES, AgentTask, TaskStatus
from agents.permissions import operator_group_ensure
from agents.services import service_user, task_start
from agents_project.worker_process import start_worker, stop_worker
from audit.selectors import audit_events
from audit.services import process_actor
from audit.timeline import describe, render
from llm.selectors import task_messages, task_usage
from llm.testing.chat_server import ChatServer
from tools.mcp import mcp_server_add
from tools.models import LedgerEntry, McpServer

SCRIPT = [
    {"think": "Customer 42 returns 3 items bought at 19.99 each, with 8% sales tax."},
    {"tool": "calc", "args": {"expression": "3 * 19.99 * 1.08"}},
    {"think": "That is 64.77 after rounding; refunds above 50 need a manager's approval."},
    {"approval": "Refund 64.77 to customer 42?"},
    {"sleep": 1.0},
    {"tool": "ledger.append", "args": {"key": "refund:customer-42", "value": 64.77}},
    {"think": "The refund is recorded once, whatever happens to the worker."},
    {"final": "Refunded 64.77 to customer 42."},
]
TIME_LIMIT = 60.0

Out = Callable[[str], None]


LLM_INPUT = {
    "system": "You handle refunds. Use calc for arithmetic and ledger.append to record a "
    "refund; answer in one sentence when done.",
    "prompt": "Customer 42 returns 3 items bought at 19.99 each, with 8% sales tax. "
    "Refund them and record the refund under the key refund:customer-42.",
    "tools": ["calc", "ledger.append"],
    "approve_tools": ["ledger.append"],
    "max_steps": 8,
    "budget": {"tokens": 20000, "model_calls": 8},
    # The model's replies stream: the demo prints them as they come (llm.streaming).
    "stream": True,
}


def _scripted_model(body: dict[str, Any]) -> dict[str, Any]:
    """The demo's stand-in for a model: the next move from what the conversation has."""
    results = [m for m in body.get("messages", []) if m.get("role") == "tool"]
    if not results:
        return {"tool_calls": [{"name": "calc", "arguments": {"expression": "3 * 19.99 * 1.08"}}]}
    if len(results) == 1:
        amount = round(float(results[0]["content"]), 2)
        return {
            "content": f"The refund is {amount:.2f}; recording it.",
            "tool_calls": [
                {
                    "name": "ledger.append",
                    "arguments": {"key": "refund:customer-42", "value": amount},
                }
            ],
        }
    return {"content": "Refunded 64.77 to customer 42 and recorded it once."}


# The supervisor (``bin/demo --supervisor``): it fans out to two specialists and waits
# for both, holding no worker. One records the refund, after a manager's approval of
# the ledger call, which the demo's manager edits (the receipt number goes into the
# key); the other asks the reference MCP time server (``mcp-server-time``, over stdio)
# for the time in Berlin, to stamp the receipt.
SUPERVISOR = [
    {"think": "Customer 42's refund: one specialist records it, another stamps the receipt."},
    {
        "spawn": [
            {
                "agent": "scripted",
                "input": {
                    "script": [
                        {"tool": "calc", "args": {"expression": "3 * 19.99 * 1.08"}},
                        {
                            "tool": "ledger.append",
                            "args": {"key": "refund:customer-42", "value": 64.77},
                            "approve": "Record the refund of 64.77 for customer 42?",
                        },
                        {"final": "Refund of 64.77 recorded."},
                    ]
                },
            },
            {
                "agent": "scripted",
                "input": {
                    "script": [
                        {
                            "tool": "mcp:time/get_current_time",
                            "args": {"timezone": "Europe/Berlin"},
                        }
                    ]
                },
            },
        ],
        "join": "all",
    },
    {"final": "Customer 42 refunded; the receipt is stamped. Both specialists reported."},
]
# The manager's edit of the ledger call: the receipt number goes into the key.
EDITED_ARGS = {"key": "refund:customer-42:receipt-7781", "value": 64.77}


def demo_run(*, out: Out, llm: bool = False, supervisor: bool = False) -> AgentTask:
    """Run (or resume) the demo task to its end, narrating it through ``out``; with
    ``llm``, the ``llm`` agent's run instead; with ``supervisor``, a supervisor that
    fans out to two child tasks (one using an MCP tool, one needing an approval that
    the demo's manager edits) and the joint timeline of the three.

    ``KeyboardInterrupt`` propagates once the worker is stopped; the task is left where
    it was, and the next run resumes it.
    """
    with _logs_to(settings.VAR_DIR / "demo.log"):
        if llm:
            return _with_model_server(out)
        if supervisor:
            _time_server_register(out)
            return _demo(out, agent="scripted", input={"script": SUPERVISOR}, env={})
        return _demo(out, agent="scripted", input={"script": SCRIPT}, env={})


def _time_server_register(out: Out) -> None:
    """Register the reference MCP time server (stdio) for the deployment, once."""
    call_command("migrate", verbosity=0)
    if not McpServer.objects.filter(name="time", owner=None).exists():
        command = f"{sys.executable} -m mcp_server_time --local-timezone UTC"
        mcp_server_add(name="time", command=command, actor=process_actor("demo"))
        out(f"Registered the MCP server 'time' (stdio: {command})")


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """Send this process's log records to ``path`` instead of the terminal."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.FileHandler(path)
    if saved and saved[0].formatter is not None:
        handler.setFormatter(saved[0].formatter)
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def _with_model_server(out: Out) -> AgentTask:
    if settings.LLM["BASE_URL"]:
        model = settings.LLM["MODEL"]
        out(f"LLM run against the model server at {settings.LLM['BASE_URL']} (model {model!r})")
        return _demo(
            out, agent="llm", input={**LLM_INPUT, **({"model": model} if model else {})}, env={}
        )
    server = ChatServer(responder=_scripted_model, chunk_delay=0.15)
    with server.running():
        out(
            "LLM run against a SCRIPTED chat-completions server on loopback "
            f"({server.url}): its answers are canned, no language model is involved. Set "
            "AGENTS_LLM_BASE_URL (and AGENTS_LLM_MODEL) to use a real one."
        )
        settings.LLM = {**settings.LLM, "BASE_URL": server.url, "MODEL": "scripted-demo"}
        env = {"AGENTS_LLM_BASE_URL": server.url, "AGENTS_LLM_MODEL": "scripted-demo"}
        return _demo(out, agent="llm", input=LLM_INPUT, env=env)


def _demo(out: Out, *, agent: str, input: dict[str, Any], env: dict[str, str]) -> AgentTask:
    call_command("migrate", verbosity=0)
    owner = service_user("demo")
    manager = service_user("manager")
    if not manager.is_staff:
        manager.is_staff = True
        manager.save(update_fields=["is_staff"])
    # An operator may decide approvals (``agents.permissions``): being staff is not enough.
    manager.groups.add(operator_group_ensure())
    log_path = settings.VAR_DIR / "demo-worker.log"
    out(f"Database {settings.DATABASES['default']['NAME']}, broker {settings.CELERY_BROKER_URL}")
    own_log = log_path.parent / "demo.log"
    out(f"Starting a worker process (its log: {log_path}; the demo's own: {own_log})")
    with open(log_path, "ab") as log:
        # If the demo is killed, its worker dies too (SIGKILL: a crash, not a clean stop),
        # so the next run finds the task unfinished and resumes it.
        deltas = settings.VAR_DIR / "demo-deltas.jsonl"
        deltas.write_text("")
        worker = start_worker(
            env={"AGENTS_SCHEDULER_INTERVAL": "0.5", "AGENTS_LLM_DELTAS_FILE": str(deltas), **env},
            concurrency=1,
            hostname="demo@%h",
            output=log,
            parent_death_signal=signal.SIGKILL,
        )
        try:
            task = _unfinished(owner, agent)
            if task is not None:
                out(f"Resuming task {task.pk}, left {task.status} at step {task.current_step}")
                stuck_tasks_republish(actor=process_actor("demo"), include_queued=True)
            else:
                task, _ = task_start(owner=owner, agent=agent, input=input)
                out(f"Started task {task.pk}")
            task = _follow(task, manager, out, _Deltas(deltas))
        finally:
            stop_worker(worker)
    _summary(task, out)
    return task


def _unfinished(owner, agent: str) -> AgentTask | None:
    return (
        AgentTask.objects.filter(owner=owner, agent_name=agent, status__in=ACTIVE_STATUSES)
        .order_by("created_at")
        .first()
    )


class _Deltas:
    """The streamed replies' pieces the worker appends to ``path``
    (``AGENTS_LLM_DELTAS_FILE``), printed as they come, on one growing line per reply."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.key = ""

    def show(self) -> None:
        with open(self.path, encoding="utf-8") as source:
            source.seek(self.offset)
            lines = source.readlines()
            self.offset = source.tell()
        for line in lines:
            if not line.endswith("\n"):
                self.offset -= len(line.encode())  # half written: read it next time
                break
            delta = json.loads(line)
            if delta["key"] != self.key:
                self.end()
                self.key = delta["key"]
                sys.stdout.write(f"  step {delta['step']}: the model is writing: ")
            sys.stdout.write(delta["delta"])
            sys.stdout.flush()

    def end(self) -> None:
        if self.key:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.key = ""


def _follow(task: AgentTask, manager, out: Out, deltas: _Deltas | None = None) -> AgentTask:
    seen = task.audit_seq if task.status != TaskStatus.PENDING else 0
    deadline = time.monotonic() + TIME_LIMIT
    while time.monotonic() < deadline:
        if deltas is not None:
            deltas.show()
        task = AgentTask.objects.get(pk=task.pk)
        if deltas is not None and task.audit_seq > seen:
            deltas.end()
        for event in audit_events(task_id=task.pk, after_seq=seen):
            out(f"  step {event.step}: {event.type}: {describe(event)}")
            seen = event.seq
        if task.status in FINAL or task.status == TaskStatus.DEAD_LETTERED:
            return task
        if task.status == TaskStatus.SUSPENDED:
            _decide(task, manager, out)
        for child in AgentTask.objects.filter(parent=task, status=TaskStatus.SUSPENDED):
            _decide(child, manager, out, label=f"child {child.spawn_index}")
        time.sleep(0.1)
    out(f"The task did not finish within {TIME_LIMIT:g} s; see the worker log.")
    return task


def _decide(task: AgentTask, manager, out: Out, *, label: str = "") -> None:
    """Play the manager on a task waiting for approval: the ledger call of the
    supervisor's refund is edited (``EDITED_ARGS``), anything else approved."""
    suspension = task.suspensions.filter(resolved_at__isnull=True).first()
    if suspension is None or suspension.kind != "approval":
        return  # waiting on its children, an event or a timer: nothing to decide
    who = f" of {label}" if label else ""
    if suspension.tool_name == "ledger.append" and task.parent_id is not None:
        out(f"  (the demo plays the manager and edits the ledger call{who}: {EDITED_ARGS})")
        task_approve(
            task_id=task.pk,
            user=manager,
            decision="edit",
            args=EDITED_ARGS,
            comment="key the refund by the receipt",
        )
        return
    out(f"  (the demo plays the manager and approves{who})")
    task_approve(task_id=task.pk, user=manager, approved=True, comment="ok, receipt checked")


def _summary(task: AgentTask, out: Out) -> None:
    ledger = LedgerEntry.objects.filter(task=task).count()
    out("")
    out(f"Task {task.pk}: {task.status}")
    out(f"Result: {task.result!r}")
    out(f"Ledger rows written by this task: {ledger} (one per idempotency key)")
    out(f"Checkpoints: {task.checkpoints.count()}")
    if task.agent_name == "llm":
        usage = task_usage(task_id=task.pk)
        out(
            f"Model calls: {usage['model_calls']}, tokens: {usage['total_tokens']} "
            f"({usage['prompt_tokens']} prompt, {usage['completion_tokens']} completion)"
        )
        out("")
        out("Conversation (GET /api/tasks/<id>/messages/ lists it):")
        for message in task_messages(task_id=task.pk):
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})"
                for c in message.tool_calls or ()
            )
            text = " ".join(message.content.split())[:160]
            out(f"  {message.seq:>2} {message.role:<9} {text}{'  -> ' + calls if calls else ''}")
    children = list(AgentTask.objects.filter(parent=task).order_by("spawn_index"))
    if children:
        _joint_timeline(task, children, out)
        return
    out("")
    out("Timeline (python manage.py audit <task id> prints it again):")
    out(render(audit_events(task_id=task.pk)))


def _joint_timeline(task: AgentTask, children: list[AgentTask], out: Out) -> None:
    """The supervisor's and its children's audit events, in time order, each line
    naming its task."""
    names = {task.pk: "supervisor"} | {c.pk: f"child {c.spawn_index}" for c in children}
    for child in children:
        out(f"Child {child.spawn_index} {child.pk}: {child.status}, result {child.result!r}")
    ledger = LedgerEntry.objects.filter(task__in=children).values_list("key", flat=True)
    out(f"Ledger rows written by the children: {list(ledger)}")
    events = [e for t in [task, *children] for e in audit_events(task_id=t.pk)]
    out("")
    out("Joint timeline (python manage.py audit <task id> prints each task's):")
    for event in sorted(events, key=lambda e: (e.created_at, e.seq)):
        when = event.created_at.strftime("%H:%M:%S.%f")[:-3]
        step = "" if event.step is None else f"step {event.step}"
        who = names[event.task_id]
        out(f"  {when}  {who:<10} {step:<8} {event.type:<16} {describe(event)}")
