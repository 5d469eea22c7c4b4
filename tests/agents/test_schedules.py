"""Issue 25.4: schedules (slots, overlap and catch-up policies, pause and resume, the
API, the command). The scheduler's job runs here in-process on a fake database clock
(``agents.core.clock.now``); ``tests/integration/test_schedules.py`` races real workers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agents.core import clock
from agents.core.suspensions import task_cancel
from agents.models import AgentTask, Schedule, ScheduleFiring, TaskStatus
from agents.schedules import schedule_create, schedule_pause, schedules_fire
from agents.services import task_start
from tests.api.conftest import token_client

pytestmark = pytest.mark.django_db(transaction=True)

WAITS = {"script": [{"approval": "go on?"}]}  # a task that stays active until decided
BERLIN_8 = {"cron": "0 8 * * *", "timezone": "Europe/Berlin"}


class FakeClock:
    """The database's clock, as this test says it is."""

    def __init__(self, monkeypatch, at: datetime) -> None:
        self.at = at
        monkeypatch.setattr(clock, "now", lambda: self.at)


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    # Friday 27 March 2026, noon UTC; Berlin moves to summer time on Sunday the 29th.
    return FakeClock(monkeypatch, datetime(2026, 3, 27, 12, 0, tzinfo=UTC))


def fire() -> int:
    return schedules_fire(actor="scheduler:test", start=task_start)


def slots_of(schedule: Schedule) -> list[datetime]:
    return list(
        AgentTask.objects.filter(schedule=schedule)
        .order_by("schedule_slot")
        .values_list("schedule_slot", flat=True)
    )


def fired(schedule: Schedule) -> list[datetime]:
    """The slots that started a task or wait to (overlap ``queue``), in order."""
    return list(
        ScheduleFiring.objects.filter(schedule=schedule, outcome__in=("started", "queued"))
        .order_by("slot")
        .values_list("slot", flat=True)
    )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_cron_schedule_fires_at_8_local_on_both_sides_of_the_dst_change(user, fake_clock):
    schedule = schedule_create(
        owner=user,
        agent="scripted",
        input={"script": [{"final": 1}]},
        catch_up="all",
        overlap="queue",
        **BERLIN_8,
    )
    assert schedule.next_slot == utc(2026, 3, 28, 7)  # 08:00 CET
    assert fire() == 0  # nothing due yet
    fake_clock.at = utc(2026, 3, 30, 6, 0, 5)
    assert fire() == 1  # the first slot's task; the others queue behind it
    # 08:00 CET, then 08:00 CEST twice, in order.
    assert fired(schedule) == [utc(2026, 3, 28, 7), utc(2026, 3, 29, 6), utc(2026, 3, 30, 6)]
    assert fire() == 0  # a slot fires once
    schedule.refresh_from_db()
    assert schedule.next_slot == utc(2026, 3, 31, 6)
    created = AgentTask.objects.get(schedule=schedule)
    event = created.audit_events.get(type="created").payload
    assert event["schedule"] == str(schedule.pk) and event["slot"] == "2026-03-28T07:00:00+00:00"


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("skip", []),
        ("one", [utc(2026, 3, 30, 6)]),
        ("all", [utc(2026, 3, 28, 7), utc(2026, 3, 29, 6), utc(2026, 3, 30, 6)]),
    ],
)
def test_catch_up_after_downtime(user, fake_clock, catch_up, expected):
    schedule = schedule_create(
        owner=user,
        agent="scripted",
        input={"script": [{"final": 1}]},
        catch_up=catch_up,
        overlap="queue",
        **BERLIN_8,
    )
    # No scheduler ran from Friday noon until Monday 09:00 Berlin: three slots missed.
    fake_clock.at = utc(2026, 3, 30, 7)
    fire()
    assert fired(schedule) == expected
    assert slots_of(schedule) == expected[:1]  # the rest queue behind the first
    if catch_up == "skip":
        skipped = ScheduleFiring.objects.get(schedule=schedule)
        assert skipped.outcome == "skipped" and skipped.slot == utc(2026, 3, 30, 6)


def test_catch_up_all_is_bounded(user, fake_clock, settings):
    settings.AGENTS = {**settings.AGENTS, "SCHEDULE_CATCH_UP_MAX": 5}
    schedule = schedule_create(
        owner=user,
        agent="scripted",
        input={"script": [{"final": 1}]},
        interval_seconds=60,
        catch_up="all",
        overlap="queue",
    )
    fake_clock.at += timedelta(hours=1)
    fire()
    # The latest five of sixty missed minutes, the first of them started, four queued.
    firings = ScheduleFiring.objects.filter(schedule=schedule).order_by("slot")
    assert [f.outcome for f in firings] == ["started"] + ["queued"] * 4
    assert firings.last().slot == fake_clock.at


def overlapping(user, fake_clock, overlap: str) -> tuple[Schedule, AgentTask]:
    schedule = schedule_create(
        owner=user, agent="scripted", input=WAITS, interval_seconds=3600, overlap=overlap
    )
    fake_clock.at = utc(2026, 3, 27, 13)
    assert fire() == 1
    first = AgentTask.objects.get(schedule=schedule)
    fake_clock.at = utc(2026, 3, 27, 14)
    return schedule, first


def test_overlap_skip(user, fake_clock):
    schedule, first = overlapping(user, fake_clock, "skip")
    assert fire() == 0
    firing = ScheduleFiring.objects.get(schedule=schedule, slot=utc(2026, 3, 27, 14))
    assert firing.outcome == "skipped" and str(first.pk) in firing.reason
    assert AgentTask.objects.filter(schedule=schedule).count() == 1


def test_overlap_queue(user, fake_clock):
    schedule, first = overlapping(user, fake_clock, "queue")
    assert fire() == 0
    assert ScheduleFiring.objects.get(slot=utc(2026, 3, 27, 14)).outcome == "queued"
    assert fire() == 0  # still waiting for the first task
    task_cancel(task_id=first.pk, user=None)
    assert fire() == 1
    assert slots_of(schedule) == [utc(2026, 3, 27, 13), utc(2026, 3, 27, 14)]
    assert ScheduleFiring.objects.get(slot=utc(2026, 3, 27, 14)).outcome == "started"


def test_overlap_cancel(user, fake_clock):
    schedule, first = overlapping(user, fake_clock, "cancel")
    assert fire() == 1
    first.refresh_from_db()
    assert first.status == TaskStatus.CANCELLED
    transition = first.audit_events.filter(type="transition").last()
    assert "schedule overlap cancel" in transition.actor
    assert slots_of(schedule) == [utc(2026, 3, 27, 13), utc(2026, 3, 27, 14)]


def test_a_paused_schedule_does_not_fire_and_resumes_from_the_next_slot(user, fake_clock):
    schedule = schedule_create(
        owner=user, agent="scripted", input=WAITS, interval_seconds=3600, catch_up="all"
    )
    schedule_pause(schedule_id=schedule.pk, user=user)
    fake_clock.at = utc(2026, 3, 27, 15, 30)
    assert fire() == 0
    schedule = schedule_pause(schedule_id=schedule.pk, user=user, paused=False)
    assert schedule.next_slot == utc(2026, 3, 27, 16)  # the paused slots are not caught up
    assert fire() == 0
    fake_clock.at = utc(2026, 3, 27, 16)
    assert fire() == 1


# --- the API --------------------------------------------------------------------------------


def test_the_api_creates_reads_edits_pauses_and_deletes_a_schedule(user):
    client = token_client(user)
    body = {"agent": "scripted", "input": WAITS, "interval_seconds": 60, "overlap": "queue"}
    created = client.post("/api/schedules/", body, format="json")
    assert created.status_code == 201, created.json()
    schedule_id = created.json()["id"]
    assert created.json()["owner"] == user.username and created.json()["catch_up"] == "one"
    assert [s["id"] for s in client.get("/api/schedules/").json()["results"]] == [schedule_id]
    url = f"/api/schedules/{schedule_id}/"
    edited = client.patch(url, {"cron": "*/5 * * * *", "timezone": "Asia/Tokyo"}, format="json")
    assert edited.status_code == 200, edited.json()
    assert edited.json()["interval_seconds"] is None and edited.json()["cron"] == "*/5 * * * *"
    assert client.post(f"{url}pause/").json()["paused"] is True
    assert client.post(f"{url}resume/").json()["paused"] is False
    assert client.get(url).json()["firings"] == []
    assert client.delete(url).status_code == 204
    assert not Schedule.objects.exists()


def test_a_task_started_by_a_schedule_names_it_in_its_detail(user, fake_clock):
    schedule, first = overlapping(user, fake_clock, "skip")
    detail = token_client(user).get(f"/api/tasks/{first.pk}/").json()
    assert detail["schedule"] == str(schedule.pk)
    assert detail["schedule_slot"].startswith("2026-03-27T13:00:00")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "every morning"}, "cron"),
        ({"interval_seconds": 60, "agent": "no-such-agent"}, "agent"),
        ({"interval_seconds": 60, "timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": "0 8 * * *", "interval_seconds": 60}, "cron"),
        ({}, "cron"),
        ({"interval_seconds": 0}, "interval_seconds"),
        ({"interval_seconds": 60, "overlap": "sometimes"}, "overlap"),
        ({"interval_seconds": 60, "input": {"script": []}}, "input.script"),
    ],
)
def test_a_bad_schedule_names_the_field_and_writes_nothing(user, change, field):
    body = {"agent": "scripted", "input": WAITS, **change}
    response = token_client(user).post("/api/schedules/", body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["field"] == field, response.json()
    assert not Schedule.objects.exists()


def test_one_owner_never_sees_or_changes_anothers_schedules(user, other_user):
    schedule = schedule_create(owner=user, agent="scripted", input=WAITS, interval_seconds=60)
    intruder = token_client(other_user)
    url = f"/api/schedules/{schedule.pk}/"
    assert intruder.get("/api/schedules/").json()["results"] == []
    assert intruder.get(url).status_code == 404
    assert intruder.patch(url, {"paused": True}, format="json").status_code == 404
    assert intruder.post(f"{url}pause/").status_code == 404
    assert intruder.delete(url).status_code == 404
    schedule.refresh_from_db()
    assert schedule.paused is False


# --- the command ------------------------------------------------------------------------------


def test_the_schedules_command(user):
    out = StringIO()
    call_command(
        "schedules", "add", "scripted", "--owner", user.username, "--input", json.dumps(WAITS),
        "--cron", "0 8 * * 1-5", "--timezone", "Europe/Berlin", "--overlap", "cancel",
        stdout=out,
    )  # fmt: skip
    schedule = Schedule.objects.get()
    assert (schedule.cron, schedule.overlap, schedule.owner) == ("0 8 * * 1-5", "cancel", user)
    call_command("schedules", "edit", str(schedule.pk), "--interval", "600", stdout=out)
    call_command("schedules", "pause", "--all", stdout=out)
    listed = StringIO()
    call_command("schedules", "list", "--json", stdout=listed)
    [row] = json.loads(listed.getvalue())
    assert (row["interval_seconds"], row["cron"], row["paused"]) == (600, "", True)
    call_command("schedules", "resume", str(schedule.pk), stdout=out)
    with pytest.raises(CommandError, match="timezone"):
        call_command("schedules", "edit", str(schedule.pk), "--timezone", "Nowhere/At_All")
    call_command("schedules", "remove", str(schedule.pk), stdout=out)
    assert not Schedule.objects.exists()


def test_the_admin_lists_schedules_and_pauses_and_resumes_them(user, django_user_model, client):
    from agents.permissions import operator_group_ensure

    olga = django_user_model.objects.create_user(username="olga", password="pw", is_staff=True)
    olga.groups.add(operator_group_ensure())
    client.force_login(olga)
    schedule = schedule_create(owner=user, agent="scripted", input=WAITS, interval_seconds=60)
    listing = client.get("/admin/agents/schedule/")
    assert listing.status_code == 200 and str(schedule.pk).encode() in listing.content
    assert client.get(f"/admin/agents/schedule/{schedule.pk}/change/").status_code == 200
    for action, paused in (("pause_schedules", True), ("resume_schedules", False)):
        response = client.post(
            "/admin/agents/schedule/", {"action": action, "_selected_action": [str(schedule.pk)]}
        )
        assert response.status_code == 302
        schedule.refresh_from_db()
        assert schedule.paused is paused
