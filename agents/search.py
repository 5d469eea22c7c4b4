"""Searching tasks the way an operator asks: by agent, owner, error text and date range.

``task_search(tasks, query)`` reads a search box's text. Words are ANDed:

==========================  ===========================================================
``<uuid>``                  that task
``agent:NAME``              tasks of that agent
``owner:USERNAME``          tasks of that user
``error:TEXT``              tasks whose error says TEXT (case-insensitive): the task's
                            error, its dead letters', or a recent failed attempt of a
                            task waiting to retry
``after:DATE``              created on or after DATE (``2026-11-29`` or an ISO time)
``before:DATE``             created before DATE
any other word              an idempotency key, an agent, an owner, or error text
==========================  ===========================================================

Quote a value with spaces: ``error:"connection refused"``.
"""

from __future__ import annotations

import shlex
from datetime import datetime, time
from uuid import UUID

from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from agents.diagnosis import LIST_WINDOW
from agents.models import AgentTask
from agents_project.errors import InvalidInput
from audit.models import AuditEvent, DeadLetter, EventType

PREFIXES = ("agent", "owner", "error", "after", "before")


def task_search(tasks: QuerySet[AgentTask], query: str) -> QuerySet[AgentTask]:
    """``tasks`` narrowed by ``query`` (see the module docstring).

    Raises ``InvalidInput`` (field ``q``) for a date that cannot be read or unbalanced
    quotes.
    """
    try:
        words = shlex.split(query)
    except ValueError as exc:
        raise InvalidInput(f"cannot read the search: {exc}", field="q") from None
    for word in words:
        prefix, _, value = word.partition(":")
        if prefix in PREFIXES and value:
            tasks = tasks.filter(_term(prefix, value))
        else:
            tasks = tasks.filter(_word(word))
    return tasks


def _term(prefix: str, value: str) -> Q:
    if prefix == "agent":
        return Q(agent_name__iexact=value)
    if prefix == "owner":
        return Q(owner__username__iexact=value)
    if prefix == "error":
        return error_matches(value)
    if prefix == "after":
        return Q(created_at__gte=_when(value, prefix))
    return Q(created_at__lt=_when(value, prefix))


def _word(word: str) -> Q:
    try:
        return Q(pk=UUID(word))
    except ValueError:
        pass
    return (
        Q(idempotency_key=word)
        | Q(agent_name__iexact=word)
        | Q(owner__username__iexact=word)
        | error_matches(word)
    )


def error_matches(text: str) -> Q:
    """Tasks whose error mentions ``text``: the task row's, a dead letter's, or (for a
    task waiting to retry) a failed attempt among its latest audit events.

    One set of task ids, the union of three index lookups (trigram indexes on the
    errors, migration ``agents.0010``; the retry timer's partial index), so a search
    reads what matches, not the whole table."""
    own = AgentTask.objects.filter(error__icontains=text).order_by().values("pk")
    letters = DeadLetter.objects.filter(error__icontains=text).order_by().values("task_id")
    failures = AuditEvent.objects.filter(
        task=OuterRef("pk"),
        seq__gt=OuterRef("audit_seq") - LIST_WINDOW,
        type=EventType.STEP_FAILED,
        payload__error__icontains=text,
    )
    retrying = AgentTask.objects.filter(retry_at__isnull=False).filter(Exists(failures)).order_by()
    return Q(pk__in=own.union(letters, retrying.values("pk")))


def _when(value: str, prefix: str) -> datetime:
    try:
        moment = parse_datetime(value)
        day = parse_date(value) if moment is None and len(value) == 10 else None
    except ValueError:
        moment = day = None
    if moment is None:
        if day is None:
            raise InvalidInput(
                f"{prefix}: wants a date (2026-11-29) or an ISO time, not {value!r}", field="q"
            )
        moment = datetime.combine(day, time.min)
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment
