"""Issue 25.4 on real workers: schedulers racing in two worker processes start exactly
one task per slot, and none is missed."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import pytest

from agents.core import clock
from agents.models import AgentTask, Schedule, ScheduleFiring, TaskStatus, WorkerVersion
from agents.schedules import schedule_create, schedule_pause, slot_at_or_before
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

SLOTS = 8


def test_two_workers_racing_start_exactly_one_task_per_slot(workers, user):
    # Both schedulers tick every 50 ms (jittered), so both see every slot come due.
    for _ in range(2):
        workers.start(concurrency=1, AGENTS_SCHEDULER_INTERVAL="0.05")
    wait_until(lambda: WorkerVersion.objects.filter(agent="scripted").count() >= 2, timeout=60)
    schedule = schedule_create(
        owner=user,
        agent="scripted",
        input={"script": [{"final": "tick"}]},
        interval_seconds=1,
        overlap="queue",
    )
    started = AgentTask.objects.filter(schedule=schedule)
    wait_until(lambda: started.count() >= SLOTS, timeout=60)
    schedule_pause(schedule_id=schedule.pk, user=None)
    wait_until(
        lambda: (
            not started.exclude(status=TaskStatus.COMPLETED).exists()
            and not ScheduleFiring.objects.filter(schedule=schedule, outcome="queued").exists()
        ),
        timeout=60,
    )

    per_slot = Counter(started.values_list("schedule_slot", flat=True))
    assert set(per_slot.values()) == {1}, per_slot  # never two tasks for one slot
    firings = ScheduleFiring.objects.filter(schedule=schedule).order_by("slot")
    slots = [f.slot for f in firings]
    # Every second from the first slot to the last fired once: none missed, none twice.
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]
    assert {f.outcome for f in firings} == {"started"}
    assert sorted(per_slot) == slots
    assert all(t.result == "tick" for t in started)
    actors = Counter(f.actor for f in firings)
    print(f"{len(slots)} slots fired by {len(actors)} scheduler(s): {dict(actors)}")


def test_after_downtime_the_missed_slots_are_caught_up_by_policy(workers, user):
    """No worker ran for over four hours of an hourly schedule: when one starts, ``one``
    runs the latest missed slot, ``all`` (with ``queue``) runs each of them in turn, and
    ``skip`` none."""
    if not 2 <= clock.now().minute <= 56:
        # Keep the next top of the hour (a new slot) and the grace after the last one
        # out of the test's way.
        time.sleep(300)
    now = clock.now()
    schedules = {
        policy: schedule_create(
            owner=user,
            agent="scripted",
            input={"script": [{"final": policy}]},
            interval_seconds=3600,
            catch_up=policy,
            overlap="queue",
        )
        for policy in ("skip", "one", "all")
    }
    latest = slot_at_or_before(schedules["one"], now)
    # Where the schedules were when the workers went away (the database's clock went on).
    Schedule.objects.update(next_slot=latest - timedelta(hours=4))
    missed = [latest - timedelta(hours=h) for h in (4, 3, 2, 1, 0)]
    workers.start(concurrency=1)

    def tasks(policy: str) -> list:
        return list(
            AgentTask.objects.filter(schedule=schedules[policy], status=TaskStatus.COMPLETED)
            .order_by("schedule_slot")
            .values_list("schedule_slot", flat=True)
        )

    wait_until(lambda: len(tasks("all")) == len(missed) and tasks("one"), timeout=90)
    assert tasks("all") == missed
    assert tasks("one") == [latest]
    assert tasks("skip") == []
    assert ScheduleFiring.objects.get(schedule=schedules["skip"]).outcome == "skipped"
