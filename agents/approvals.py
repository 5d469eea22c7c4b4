"""Who may decide an approval: separation of duties, declared per agent.

An agent class may say::

    class Refunds(Agent):
        approvers = "refund-approvers"   # a Django group; members decide its approvals
        owner_may_approve = False        # the task's owner may not decide their own

Both are optional: without them, whoever may operate the task (``agents.permissions``:
its owner, or ``change_agenttask``) decides. Members of ``approvers`` also need to see
the task: give the group ``agents.change_agenttask`` (or add them to ``operators``).
With ``approvers`` set, the system (a command without ``--as USER``) cannot decide:
every decision names a person. ``suspensions.task_approve`` calls ``approval_check``
under the task's row lock, before recording anything. The rules are the same for every
decision: approve, edit, reject and respond (``decision_check``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonschema

from agents.definition import get_agent
from agents.models import AgentTask
from agents_project.errors import Forbidden, InvalidInput, ToolArgumentError
from tools.registry import find_tool


def approval_rules(agent_name: str) -> tuple[str | None, bool]:
    """``(approvers group or None, owner_may_approve)`` of the agent ``agent_name``."""
    try:
        definition = get_agent(agent_name)
    except Exception:  # an agent no longer registered: no extra rule to apply
        return None, True
    approvers = getattr(definition, "approvers", None) or None
    return approvers, bool(getattr(definition, "owner_may_approve", True))


def approval_check(*, user: Any, task: AgentTask) -> None:
    """Raise ``Forbidden`` if ``user`` (``None``: the system) may not decide ``task``'s
    approval under its agent's rules; the caller has already checked that ``user`` may
    operate the task at all."""
    approvers, owner_may_approve = approval_rules(task.agent_name)
    if user is None:
        if approvers:
            raise Forbidden(
                f"approvals of {task.agent_name!r} are decided by a member of {approvers!r}: "
                "name one (--as USER)"
            )
        return
    if not owner_may_approve and user.pk == task.owner_id:
        raise Forbidden(
            f"the owner of a {task.agent_name!r} task may not decide its approval "
            "(separation of duties)"
        )
    if approvers and not user.groups.filter(name=approvers).exists():
        raise Forbidden(f"approvals of {task.agent_name!r} need a member of {approvers!r}")


# --- decisions: approve, edit, reject, respond -----------------------------------------

DECISIONS = ("approve", "edit", "reject", "respond")
MAX_MESSAGE = 100_000


@dataclass(frozen=True)
class Decision:
    """A person's answer to an approval, checked (``decision_check``).

    ``args``: the arguments the tool runs with after an ``edit``; ``diff``: the JSON
    Patch (RFC 6902) from the original arguments to them; ``message``: what a
    ``respond`` gives the agent as the tool's result."""

    decision: str
    args: dict[str, Any] | None = None
    diff: list[dict[str, Any]] | None = None
    message: str = ""

    @property
    def approved(self) -> bool:
        return self.decision in ("approve", "edit")


def decision_check(
    *,
    decision: Any,
    approved: Any,
    args: Any,
    message: Any,
    tool_name: str,
    tool_args: Any,
) -> Decision:
    """The decision asked for, checked against the approval it answers (``tool_name``
    and ``tool_args``: the tool call it is about, ``""`` when it is not one).

    ``decision`` or the older ``approved`` (True: approve, False: reject) says what to
    do. ``edit`` needs ``args`` that fit the tool's JSON Schema and its own checks;
    ``respond`` needs a ``message``; both only for the approval of a tool call.
    ``InvalidInput`` names the field (``args.FIELD`` for an argument)."""
    if decision is None:
        if not isinstance(approved, bool):
            raise InvalidInput(
                "give decision (approve, edit, reject, respond) or approved", field="approved"
            )
        decision = "approve" if approved else "reject"
    elif approved is not None and approved != (decision in ("approve", "edit")):
        raise InvalidInput(f"contradicts approved: {approved}", field="decision")
    if decision not in DECISIONS:
        raise InvalidInput(f"must be one of {', '.join(DECISIONS)}", field="decision")
    if args is not None and decision != "edit":
        raise InvalidInput("only an edit takes args", field="args")
    if message is not None and decision != "respond":
        raise InvalidInput("only a respond takes a message", field="message")
    if decision in ("edit", "respond") and not tool_name:
        raise InvalidInput(
            f"{decision} needs the approval of a tool call; this one is not", field="decision"
        )
    if decision == "respond":
        if not isinstance(message, str) or not message or len(message) > MAX_MESSAGE:
            raise InvalidInput(
                f"must be a non-empty string of at most {MAX_MESSAGE} characters",
                field="message",
            )
        return Decision("respond", message=message)
    if decision == "edit":
        edited = edited_args_check(tool_name=tool_name, args=args)
        original = dict(tool_args or {})
        diff = jsonpatch.make_patch(original, edited).patch
        return Decision("edit", args=edited, diff=diff)
    return Decision(decision)


def edited_args_check(*, tool_name: str, args: Any) -> dict[str, Any]:
    """``args`` for the tool ``tool_name``, validated against its JSON Schema
    (``Tool.parameters_schema``, with ``jsonschema``) and then its own argument checks,
    defaults filled in. ``InvalidInput`` names ``args`` or ``args.FIELD``."""
    tool = find_tool(tool_name)
    if tool is None:
        raise InvalidInput(f"the tool {tool_name!r} is no longer registered", field="args")
    if not isinstance(args, dict):
        raise InvalidInput("must be an object of the tool's arguments", field="args")
    validator = jsonschema.Draft202012Validator(tool.parameters_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        if not where and error.validator in ("required", "additionalProperties"):
            names = re.findall(r"'([^']+)'", error.message)
            where = names[0] if names else ""
        raise InvalidInput(error.message, field=f"args.{where}" if where else "args")
    try:
        return tool.validate(args)
    except ToolArgumentError as exc:
        raise InvalidInput(str(exc), field=exc.field) from None
