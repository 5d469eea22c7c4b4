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
under the task's row lock, before recording anything.
"""

from __future__ import annotations

from typing import Any

from agents.definition import get_agent
from agents.models import AgentTask
from agents_project.errors import Forbidden


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
