"""New tasks are pinned to the version intake chooses, as their row is inserted.

``agents.services.task_start`` writes ``agent_version`` from the code of the process
that accepts the task; this ``pre_save`` receiver replaces it, before the INSERT, with
``agents.core.versions.version_for_new_task`` (the newest version live workers serve,
or the ``AGENTS_VERSION_RAMP`` split, never a held version). The checkpoint of step 0
of such a task is written with schema version 0 and an empty state: this process's
code is not the task's, so the worker of the task's version computes ``initial_state``
of the input itself when it runs step 1 (``agents.core.engine``).
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import pre_save
from django.dispatch import receiver

from agents.core.versions import version_for_new_task
from agents.definition import registered_agents
from agents.models import AgentTask, Checkpoint


@receiver(pre_save, sender=AgentTask, dispatch_uid="rollout-intake")
def task_version_choose(sender: Any, instance: AgentTask, raw: bool = False, **kwargs: Any) -> None:
    if raw or not instance._state.adding:
        return
    agent = registered_agents().get(instance.agent_name)
    if agent is None or instance.agent_version != agent.version:
        return  # not a task this process's code started (a copy, a replay of another)
    instance.agent_version = version_for_new_task(agent=agent)


@receiver(pre_save, sender=Checkpoint, dispatch_uid="rollout-initial-state")
def initial_state_defer(
    sender: Any, instance: Checkpoint, raw: bool = False, **kwargs: Any
) -> None:
    if raw or not instance._state.adding or instance.step != 0:
        return
    task = instance.task  # the task task_start just created (cached on the instance)
    agent = registered_agents().get(task.agent_name)
    if agent is not None and task.agent_version != agent.version:
        instance.state = {}
        instance.schema_version = 0
