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

from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.db.models.lookups import IsNull
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from agents.diagnosis import LIST_WINDOW
from agents.models import AgentTask
from agents_project.errors import InvalidInput
from agents_project.estimates import query_estimate, table_estimate
from audit.models import AuditEvent, DeadLetter, EventType

PREFIXES = ("agent", "owner", "error", "after", "before")
# An error search walks the list when enough tasks match (``walks``): a page is 50 rows
# (the admin's), and a row walked in index order costs about a fifth of a match read at
# random (measured at 10^6 tasks: 2.5 against 12 microseconds), so 50 / 5 = 10.
WALK_FACTOR = 10


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

    Two ways to the same tasks, chosen by the planner's estimate of how many match
    (``error_estimate``) against the table's size (``walks``):

    - few match: one set of task ids, the union of three index lookups (trigram indexes
      on the errors, migration ``agents.0015``; the retry timer's partial index), so a
      search reads what matches, not the whole table; it costs as many rows as match;
    - many match: each task tested in the list's own order (the row's error, then one
      probe of the dead letters' ``(task_id)`` index, then, for a task waiting to retry,
      its latest error events), so a page stops after its 50 rows: it costs the rows
      walked before a page is found, the table's size over the matches.
    """
    if walks(error_estimate(text), table_estimate(AgentTask)):
        return _error_walk(text)
    return _error_union(text)


def walks(matches: int | None, tasks: int | None) -> bool:
    """Whether a search expected to find ``matches`` of ``tasks`` tasks tests them in
    list order (True) rather than reading what matches (False): when ``matches`` is at
    least ``sqrt(WALK_FACTOR * tasks)``, where the two costs meet (``matches`` rows read
    at random, against ``50 * tasks / matches`` rows walked in order at a fifth of the
    price), so neither way costs more than about that many random reads: 3,200 of a
    million tasks."""
    if matches is None or not tasks:
        return False
    return matches * matches >= WALK_FACTOR * tasks


def error_estimate(text: str) -> int | None:
    """The planner's estimate of the tasks ``error:TEXT`` finds (no query is run): the
    larger of its estimates of tasks and dead letters whose error mentions ``text`` (a
    dead-lettered task usually carries its error in both). None without one (SQLite)."""
    own = query_estimate(AgentTask.objects.filter(error__icontains=text).values("pk"))
    letters = query_estimate(DeadLetter.objects.filter(error__icontains=text).values("pk"))
    if own is None or letters is None:
        return None
    return max(own, letters)


def task_search_estimate(query: str) -> int | None:
    """The planner's estimate of the tasks ``query`` finds, for a search that is one
    ``error:TEXT`` term (the one that can match much of the table); None for any other
    search (count it)."""
    try:
        words = shlex.split(query)
    except ValueError:
        return None
    if len(words) != 1:
        return None
    prefix, _, value = words[0].partition(":")
    if prefix != "error" or not value:
        return None
    return error_estimate(value)


def _failures(text: str) -> Exists:
    """A failed attempt mentioning ``text`` among the task's latest events (correlated
    with the outer task)."""
    return Exists(
        AuditEvent.objects.filter(
            task=OuterRef("pk"),
            seq__gt=OuterRef("audit_seq") - LIST_WINDOW,
            type=EventType.STEP_FAILED,
            payload__error__icontains=text,
        )
    )


def _error_union(text: str) -> Q:
    own = AgentTask.objects.filter(error__icontains=text).order_by().values("pk")
    letters = DeadLetter.objects.filter(error__icontains=text).order_by().values("task_id")
    retrying = AgentTask.objects.filter(retry_at__isnull=False).filter(_failures(text)).order_by()
    return Q(pk__in=own.union(letters, retrying.values("pk")))


def _error_walk(text: str) -> Q:
    # The dead letter test is a scalar subquery, not EXISTS: PostgreSQL would turn an
    # EXISTS under OR into a hashed subplan that reads every matching dead letter first.
    letter = DeadLetter.objects.filter(task=OuterRef("pk"), error__icontains=text).order_by()
    return (
        Q(error__icontains=text)
        | Q(IsNull(Subquery(letter.values("pk")[:1]), False))
        | (Q(retry_at__isnull=False) & Q(_failures(text)))
    )


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
