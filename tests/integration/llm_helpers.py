"""Helpers of the LLM integration tests: the worker environment for the scripted chat
server (the ``chat`` fixture, ``tests/integration/conftest.py``), starting an ``llm``
task, reading how it ended."""

from __future__ import annotations

from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from llm.testing.chat_server import ChatServer

TOOLS_MODULE = "tests.integration.llm_tools"


def llm_env(chat: ChatServer, **extra: str) -> dict[str, str]:
    return {
        "AGENTS_MODULES": TOOLS_MODULE,
        "AGENTS_LLM_BASE_URL": chat.url,
        "AGENTS_LLM_MODEL": "scripted",
        "AGENTS_LLM_TIMEOUT": "5",
        **extra,
    }


def start(user, **input) -> AgentTask:
    return task_start(owner=user, agent="llm", input={"prompt": "go", **input})[0]


def status_of(task: AgentTask) -> str:
    return AgentTask.objects.values_list("status", flat=True).get(pk=task.pk)


def ended(task: AgentTask) -> AgentTask | None:
    fresh = AgentTask.objects.get(pk=task.pk)
    done = fresh.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD_LETTERED)
    return fresh if done else None
