"""Schedules: start a task of an agent at every slot of a cron expression or an interval.

A slot is a point in time: for ``cron``, each time the expression matches on the wall
clock of the schedule's ``timezone`` (croniter over ``zoneinfo``, so "0 8 * * *" is 08:00
local on both sides of a daylight-saving change); for ``interval_seconds``, every
multiple of the interval since the Unix epoch (UTC), so every worker computes the same
slots with no shared state.

**Exactly once per slot.** ``schedules_fire`` runs in every worker's scheduler thread
(``agents.core.scheduler.Scheduler``, which the worker gives it as a job). It locks each
due schedule row with ``SKIP LOCKED`` (a schedule another scheduler is firing is left to
it) and writes one ``ScheduleFiring`` per slot it handles, under a unique constraint on
``(schedule, slot)``, in the same transaction as the task the slot starts. Two
schedulers that both got past the lock (say, one whose lock wait ended after the other
committed and read a stale row) cannot both write the slot: the second insert fails and
its transaction starts nothing. A task started by a schedule carries ``schedule`` and
``schedule_slot``, and its ``created`` audit event names both.

**Overlap** (a slot comes while a task the schedule started is still pending, running
or suspended): ``skip`` records the slot ``skipped``; ``queue`` records it ``queued``
and starts it once the schedule has no task active (oldest queued slot first, one at a
time); ``cancel`` cancels the active task(s) (a ``transition`` to ``cancelled`` by the
scheduler) and starts the slot's.

**Catch-up** (slots passed while no scheduler ran, more than ``AGENTS_SCHEDULE_GRACE``
seconds ago): ``skip`` starts none of them (the latest is recorded ``skipped``); ``one``
starts one task, for the latest missed slot; ``all`` starts one per missed slot, the
latest ``AGENTS_SCHEDULE_CATCH_UP_MAX`` of them, oldest first. Slots that pass while a
schedule is paused are not missed: ``resume`` starts from the next slot after now.

Why croniter: it is a small, widely used parser with time-zone aware iteration and no
scheduler of its own. django-celery-beat's crontab model would bring celery beat's
tables and its single-process beat scheduler, whose role here is the database-fenced
scheduler thread every worker already runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import CroniterBadCronError, croniter
from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Q, QuerySet

from agents import permissions
from agents.core import clock
from agents.core.suspensions import task_cancel
from agents.definition import get_agent, registered_agents
from agents.models import ACTIVE_STATUSES, AgentTask, Schedule, ScheduleFiring
from agents_project.errors import Backpressure, Conflict, Forbidden, InvalidInput, NotFound
from agents_project.validation import json_value_check

logger = structlog.get_logger(__name__)

Overlap = Schedule.Overlap
CatchUp = Schedule.CatchUp
Outcome = ScheduleFiring.Outcome
# The longest interval a schedule may have: ten years, in seconds.
MAX_INTERVAL = 10 * 366 * 86400
BATCH = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- slots --------------------------------------------------------------------------------


def slot_after(schedule: Schedule, after: datetime) -> datetime:
    """The schedule's first slot strictly after ``after`` (aware), in UTC."""
    if schedule.interval_seconds:
        step = schedule.interval_seconds
        n = math.floor((after - EPOCH).total_seconds() / step) + 1
        return EPOCH + timedelta(seconds=n * step)
    local = after.astimezone(ZoneInfo(schedule.timezone))
    return croniter(schedule.cron, local).get_next(datetime).astimezone(UTC)


def slot_at_or_before(schedule: Schedule, at: datetime) -> datetime:
    """The schedule's latest slot at or before ``at`` (aware), in UTC."""
    if schedule.interval_seconds:
        step = schedule.interval_seconds
        n = math.floor((at - EPOCH).total_seconds() / step)
        return EPOCH + timedelta(seconds=n * step)
    local = at.astimezone(ZoneInfo(schedule.timezone))
    before = croniter(schedule.cron, local).get_prev(datetime)
    # ``get_prev`` is strictly before ``at``: the slot after it may be ``at`` itself.
    following = croniter(schedule.cron, before).get_next(datetime)
    return (following if following <= at else before).astimezone(UTC)


def _slots_before(
    schedule: Schedule, latest: datetime, *, since: datetime, limit: int
) -> list[datetime]:
    """Up to ``limit`` slots from ``latest`` back to ``since`` (inclusive), oldest first."""
    slots = [latest]
    while len(slots) < limit:
        if schedule.interval_seconds:
            earlier = slots[-1] - timedelta(seconds=schedule.interval_seconds)
        else:
            local = slots[-1].astimezone(ZoneInfo(schedule.timezone))
            earlier = croniter(schedule.cron, local).get_prev(datetime).astimezone(UTC)
        if earlier < since:
            break
        slots.append(earlier)
    return slots[::-1]


# --- validation ---------------------------------------------------------------------------


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (a schedule's, all of them) checked, each error naming its field."""
    agent = fields["agent_name"]
    if not isinstance(agent, str) or not agent:
        raise InvalidInput("must be the name of an agent", field="agent")
    definition = get_agent(agent)
    json_value_check(fields["input"], field="input")
    definition.validate_input(fields["input"])
    cron, interval = fields["cron"], fields["interval_seconds"]
    if bool(cron) == (interval is not None):
        raise InvalidInput("give exactly one of cron and interval_seconds", field="cron")
    if cron:
        if not isinstance(cron, str) or len(cron) > 200:
            raise InvalidInput("must be a cron expression", field="cron")
        try:
            croniter(cron)
        except (CroniterBadCronError, ValueError, KeyError) as exc:
            raise InvalidInput(f"is not a valid cron expression: {exc}", field="cron") from None
    elif (
        isinstance(interval, bool)
        or not isinstance(interval, int)
        or not 1 <= interval <= MAX_INTERVAL
    ):
        raise InvalidInput(f"must be an integer from 1 to {MAX_INTERVAL}", field="interval_seconds")
    zone = fields["timezone"]
    try:
        if not isinstance(zone, str) or not zone:
            raise ValueError(zone)
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"unknown time zone {zone!r}", field="timezone") from None
    for name, choices in (("overlap", Overlap), ("catch_up", CatchUp)):
        if fields[name] not in choices.values:
            raise InvalidInput(f"must be one of {', '.join(choices.values)}", field=name)
    if not isinstance(fields["paused"], bool):
        raise InvalidInput("must be true or false", field="paused")
    return fields


_FIELDS = ("agent_name", "input", "cron", "interval_seconds", "timezone", "overlap", "catch_up")


def schedule_create(
    *,
    owner: User,
    agent: Any,
    input: Any,
    cron: Any = "",
    interval_seconds: Any = None,
    timezone: Any = "UTC",
    overlap: Any = Overlap.SKIP,
    catch_up: Any = CatchUp.ONE,
    paused: Any = False,
) -> Schedule:
    """A new schedule of ``owner``'s, its first slot the next after now. Every field is
    checked first (``InvalidInput`` names it); nothing is written on an error."""
    fields = _checked(
        {
            "agent_name": agent,
            "input": input,
            "cron": cron or "",
            "interval_seconds": interval_seconds,
            "timezone": timezone,
            "overlap": overlap,
            "catch_up": catch_up,
            "paused": paused,
        }
    )
    schedule = Schedule(owner=owner, **fields)
    now = clock.now()
    schedule.created_at = schedule.updated_at = now
    schedule.next_slot = slot_after(schedule, now)
    schedule.save(force_insert=True)
    logger.info("schedule created", schedule=str(schedule.pk), owner=owner.get_username())
    return schedule


def schedules_visible_to(user: Any) -> QuerySet[Schedule]:
    """Every schedule for a holder of ``view_schedule`` or ``change_schedule`` (and the
    system, ``None``); else the user's own."""
    schedules = Schedule.objects.select_related("owner")
    if permissions.has(user, permissions.SCHEDULE_VIEW, permissions.SCHEDULE_CHANGE):
        return schedules
    if user is None or not getattr(user, "is_active", False) or user.pk is None:
        return schedules.none()
    return schedules.filter(owner_id=user.pk)


def schedule_get(*, schedule_id: UUID | str, user: Any) -> Schedule:
    """The schedule, if ``user`` may see it; ``NotFound`` otherwise (its existence is
    not disclosed)."""
    try:
        pk = schedule_id if isinstance(schedule_id, UUID) else UUID(str(schedule_id))
    except ValueError:
        raise NotFound(f"no schedule {schedule_id}") from None
    schedule = schedules_visible_to(user).filter(pk=pk).first()
    if schedule is None:
        raise NotFound(f"no schedule {schedule_id}")
    return schedule


def _locked(schedule_id: UUID | str, user: Any) -> Schedule:
    schedule = schedule_get(schedule_id=schedule_id, user=user)
    if not (
        permissions.has(user, permissions.SCHEDULE_CHANGE)
        or (user is not None and user.pk == schedule.owner_id)
    ):
        raise Forbidden(f"you may read schedule {schedule.pk} but not change it")
    return Schedule.objects.select_for_update().get(pk=schedule.pk)


def schedule_update(*, schedule_id: UUID | str, user: Any, **changes: Any) -> Schedule:
    """Change some of a schedule's fields (those of ``schedule_create``). A change of
    when it fires (cron, interval, time zone) starts from the next slot after now."""
    unknown = sorted(set(changes) - {"agent", *_FIELDS, "paused"})
    if unknown:
        raise InvalidInput("is not a field of a schedule", field=unknown[0])
    with transaction.atomic():
        schedule = _locked(schedule_id, user)
        fields = {name: getattr(schedule, name) for name in (*_FIELDS, "paused")}
        if "agent" in changes:
            fields["agent_name"] = changes.pop("agent")
        if changes.get("cron"):
            fields["interval_seconds"] = None
        if changes.get("interval_seconds") is not None:
            fields["cron"] = ""
        fields.update(changes)
        fields["cron"] = fields["cron"] or ""
        _checked(fields)
        timing = ("cron", "interval_seconds", "timezone")
        retime = any(fields[k] != getattr(schedule, k) for k in timing) or (
            schedule.paused and not fields["paused"]
        )
        for name, value in fields.items():
            setattr(schedule, name, value)
        now = clock.now()
        if retime:
            schedule.next_slot = slot_after(schedule, now)
        schedule.updated_at = now
        schedule.save()
    return schedule


def schedule_pause(*, schedule_id: UUID | str, user: Any, paused: bool = True) -> Schedule:
    """Pause a schedule (no slot fires until it is resumed), or resume it: it fires
    again from the next slot after now; the slots of the pause are not caught up."""
    return schedule_update(schedule_id=schedule_id, user=user, paused=paused)


def schedules_pause_all(*, paused: bool = True) -> int:
    """Pause (or resume) every schedule at once (an operator's switch); how many changed."""
    now = clock.now()
    changed = 0
    with transaction.atomic():
        for schedule in Schedule.objects.select_for_update().filter(paused=not paused):
            schedule.paused = paused
            schedule.updated_at = now
            if not paused:
                schedule.next_slot = slot_after(schedule, now)
            schedule.save(update_fields=("paused", "updated_at", "next_slot"))
            changed += 1
    return changed


def schedule_delete(*, schedule_id: UUID | str, user: Any) -> None:
    """Remove a schedule and its firing record; the tasks it started stay (their
    ``schedule`` becomes null)."""
    with transaction.atomic():
        _locked(schedule_id, user).delete()


# --- firing -------------------------------------------------------------------------------


def schedule_grace() -> float:
    """Seconds after its slot that a firing still counts as on time
    (``AGENTS_SCHEDULE_GRACE``); older slots are missed and follow ``catch_up``."""
    return float(settings.AGENTS.get("SCHEDULE_GRACE", 60))


def catch_up_max() -> int:
    return int(settings.AGENTS.get("SCHEDULE_CATCH_UP_MAX", 100))


def schedules_due() -> QuerySet[Schedule]:
    """Unpaused schedules of agents this process knows, with a slot passed or a queued
    slot waiting."""
    queued = ScheduleFiring.objects.filter(schedule=OuterRef("pk"), outcome=Outcome.QUEUED)
    return Schedule.objects.filter(
        Q(next_slot__lte=clock.now()) | Q(Exists(queued)),
        paused=False,
        agent_name__in=list(registered_agents()),
    )


def schedules_fire(*, actor: str, start: Callable[..., tuple[AgentTask, bool]]) -> int:
    """Fire every due schedule (``schedules_due``), each locked in its own transaction
    (rows another scheduler holds are skipped). Returns how many tasks started.
    ``start`` is ``agents.services.task_start``. A refused publish stops the pass and
    rolls its schedule back (``Backpressure``): the next tick tries again. Safe to run
    in any number of processes at once."""
    started = 0
    for schedule_id in list(schedules_due().values_list("pk", flat=True)[:BATCH]):
        try:
            with transaction.atomic():
                schedule = (
                    schedules_due()
                    .select_for_update(skip_locked=True, of=("self",))
                    .filter(pk=schedule_id)
                    .first()
                )
                if schedule is not None:
                    started += _schedule_fire(schedule, actor=actor, start=start)
        except Backpressure:
            break
        except IntegrityError:
            # Another scheduler recorded one of these slots first: it started them.
            logger.info("schedule slot already fired elsewhere", schedule=str(schedule_id))
        except Exception:
            # One schedule's failure (rolled back, tried again next tick) must not keep
            # the others from firing.
            logger.exception("schedule could not fire", schedule=str(schedule_id))
    return started


def _schedule_fire(schedule: Schedule, *, actor: str, start: Callable[..., Any]) -> int:
    now = clock.now()
    started = 0
    if schedule.next_slot is not None and schedule.next_slot <= now:
        latest = slot_at_or_before(schedule, now)
        if latest >= schedule.next_slot:
            late = (now - latest).total_seconds() > schedule_grace()
            limit = catch_up_max() if schedule.catch_up == CatchUp.ALL else 1
            slots = _slots_before(schedule, latest, since=schedule.next_slot, limit=limit)
            for slot in slots:
                if late and schedule.catch_up == CatchUp.SKIP:
                    _record(schedule, slot, Outcome.SKIPPED, actor, "missed (catch_up skip)")
                else:
                    started += _slot_fire(schedule, slot, actor=actor, start=start)
        schedule.next_slot = slot_after(schedule, max(now, latest))
        schedule.save(update_fields=("next_slot",))
    # Queued slots start one at a time once nothing of the schedule is active (also
    # after its overlap policy changed: a queued slot is never left behind).
    if not _active(schedule).exists():
        queued = (
            ScheduleFiring.objects.select_for_update()
            .filter(schedule=schedule, outcome=Outcome.QUEUED)
            .order_by("slot")
            .first()
        )
        if queued is not None:
            queued.outcome = Outcome.STARTED
            queued.task = _start(schedule, queued.slot, actor=actor, start=start, firing=queued)
            queued.save(update_fields=("task", "outcome", "reason"))
            started += queued.task is not None
    return started


def _active(schedule: Schedule) -> QuerySet[AgentTask]:
    return AgentTask.objects.filter(schedule=schedule, status__in=ACTIVE_STATUSES)


def _slot_fire(schedule: Schedule, slot: datetime, *, actor: str, start: Callable[..., Any]) -> int:
    """Handle one slot by the overlap policy; 1 if it started a task."""
    active = list(_active(schedule).values_list("pk", flat=True))
    if active and schedule.overlap == Overlap.SKIP:
        _record(
            schedule, slot, Outcome.SKIPPED, actor, f"task {active[0]} still active (overlap skip)"
        )
        return 0
    if active and schedule.overlap == Overlap.QUEUE:
        _record(
            schedule, slot, Outcome.QUEUED, actor, f"waits for task {active[0]} (overlap queue)"
        )
        return 0
    firing = _record(schedule, slot, Outcome.STARTED, actor, "")
    for task_id in active:
        with contextlib.suppress(Conflict):  # it ended meanwhile
            task_cancel(task_id=task_id, user=None, actor=f"{actor} (schedule overlap cancel)")

    firing.task = _start(schedule, slot, actor=actor, start=start, firing=firing)
    if firing.task is None:
        return 0
    firing.save(update_fields=("task",))
    return 1


def _record(
    schedule: Schedule, slot: datetime, outcome: str, actor: str, reason: str
) -> ScheduleFiring:
    """The slot's one firing row (``IntegrityError`` if it exists: fired elsewhere)."""
    return ScheduleFiring.objects.create(
        schedule=schedule, slot=slot, outcome=outcome, reason=reason, actor=actor
    )


def _start(
    schedule: Schedule,
    slot: datetime,
    *,
    actor: str,
    start: Callable[..., Any],
    firing: ScheduleFiring | None = None,
) -> AgentTask | None:
    """Start the slot's task; on a refused input (the agent's rules changed), record the
    firing ``failed`` with the reason and start nothing."""
    try:
        with transaction.atomic():
            task, _ = start(
                owner=schedule.owner,
                agent=schedule.agent_name,
                input=schedule.input,
                actor=actor,
                schedule=schedule,
                schedule_slot=slot,
            )
    except InvalidInput as exc:
        logger.warning("scheduled task refused", schedule=str(schedule.pk), error=str(exc))
        if firing is not None:
            firing.outcome = Outcome.FAILED
            firing.reason = f"{exc.field}: {exc}"
            firing.save(update_fields=("outcome", "reason"))
        return None
    logger.info(
        "schedule fired", schedule=str(schedule.pk), slot=slot.isoformat(), task_id=str(task.pk)
    )
    return task
