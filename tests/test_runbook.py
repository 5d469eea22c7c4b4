"""Every ``python manage.py ...`` command RUNBOOK.md shows in a code block runs, as
written, against the test database: none can rot unnoticed.

Placeholders are filled from tasks made the real way, each in the state its command
acts on: ``TASK_ID`` (a suspended task for ``approve``, one waiting for an event for
``signal``, a dead-lettered one for ``requeue_dead_letters``, a completed one
otherwise), ``N`` (a step of it), ``EVENT`` (the event it waits for).
"""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.api.factories import completed, dead_lettered, waiting_for_approval, waiting_for_event

RUNBOOK = Path(__file__).resolve().parents[1] / "RUNBOOK.md"
FENCE = re.compile(r"^\s*```(?:sh|bash|console)?\s*$")
# healthcheck reports a problem with exit code 1: that is an answer, not a broken command.
REPORTS_BY_EXIT_CODE = {"healthcheck"}


def runbook_commands() -> list[str]:
    commands, inside = [], False
    for line in RUNBOOK.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        stripped = line.strip()
        if inside and stripped.startswith("python manage.py "):
            commands.append(stripped.split("  #", 1)[0].strip())
    return commands


def test_the_runbook_shows_the_commands_an_operator_needs():
    shown = {shlex.split(c)[2] for c in runbook_commands()}
    assert {
        "audit",
        "resume_stuck",
        "breakers",
        "requeue_dead_letters",
        "replay",
        "approve",
        "signal",
        "waits",
        "suggest_timeouts",
        "healthcheck",
        "showmigrations",
    } <= shown


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("command", runbook_commands())
def test_a_runbook_command_runs_as_written(command, user, monkeypatch, tmp_path):
    argv = shlex.split(command)[2:]
    name = argv[0]
    if name == "approve":
        task = waiting_for_approval(user)
    elif name == "signal":
        task = waiting_for_event(user)
    elif name == "requeue_dead_letters":
        task, _ = dead_lettered(user)
    else:
        task = completed(user)
    values = {"TASK_ID": str(task.pk), "N": "2", "EVENT": "paid"}
    # The procedures' shell variables: the scripted agent, a case file and its baseline.
    values |= {"$AGENT": "scripted", "$VERSION": "1.0"}
    if name == "evaluate":
        values |= _evaluation_files(tmp_path)
    args = [values.get(arg, arg) for arg in argv[1:]]
    monkeypatch.setattr("sys.stdin", io.StringIO("a-secret-value\n"))
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=err)
    except SystemExit as exc:
        assert name in REPORTS_BY_EXIT_CODE and exc.code == 1, (command, exc, err.getvalue())
    except CommandError as exc:
        # "not ready: ..." (a breaker another test left open in this process's Redis
        # namespace, say) is healthcheck's answer, with its exit code 1.
        assert name in REPORTS_BY_EXIT_CODE and exc.returncode == 1, (command, exc)
        assert str(exc).startswith("not ready: "), (command, exc)


def _evaluation_files(folder: Path) -> dict[str, str]:
    """``$CASES`` (one case of the scripted agent), ``$BASELINE`` saved from it, and
    where ``$REPORT`` goes."""
    cases, baseline = folder / "cases.jsonl", folder / "baseline.json"
    case = {
        "id": "final",
        "input": {"script": [{"final": "ok"}]},
        "expect": {"answer_equals": "ok"},
    }
    cases.write_text(json.dumps(case) + "\n")
    call_command("evaluate", str(cases), "--agent", "scripted", "--save-baseline", str(baseline),
                 stdout=io.StringIO())  # fmt: skip
    return {"$CASES": str(cases), "$BASELINE": str(baseline), "$REPORT": str(folder / "r.json")}
