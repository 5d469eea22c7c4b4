"""Evaluation: run cases through the real engine, grade them, compare with a baseline.

- ``cases_load(path=...)``: the cases of a JSONL file, checked (``InvalidInput`` names
  the line and field) before anything runs.
- ``evaluation_run(...)``: each case is a real task (owner ``evaluation``), its steps
  executed in this process by ``agents.core.engine.step_execute`` with the engine's
  publishes collected instead of sent (``agents.core.dispatch.publishes_collected``):
  no broker, no worker, the same code path as production. Model replies come from a
  recording or from the configured model (``evals.recording``).
- ``report_compare(report=..., baseline=...)``: regressions (passed, now failed or
  missing), fixes (failed, now passed), and the deltas of tokens and cost.
- ``report_table(report)``: the report as text for a terminal.

The tasks are written to the configured database like any other (they are how the
runs are inspected afterwards: ``/api/tasks/<id>/``, the audit trail). Run it against a
database no live worker serves (CI's own, or a staging copy): a live worker's scheduler
would otherwise fire an evaluation task's retry on the broker.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from agents.core import dispatch
from agents.core.engine import step_execute
from agents.core.state_machine import RUNNABLE
from agents.core.versions import local_intake
from agents.definition import get_agent
from agents.models import AgentTask, Checkpoint
from agents.services import service_user, task_start
from agents_project.errors import InvalidInput
from audit.models import AuditEvent, EventType
from evals.graders import Run, expectations_check, grades_for
from evals.recording import Recording
from llm.client import chat_transport
from llm.models import ModelCall

OWNER = "evaluation"
REPORT_FORMAT = 1


@dataclass(frozen=True)
class Case:
    id: str
    input: Any
    expect: dict[str, Any] = field(default_factory=dict)


def cases_load(*, path: Path) -> list[Case]:
    """The cases of ``path``: one JSON object a line, ``{"id", "input", "expect"}``;
    blank lines and lines starting with ``#`` are skipped. Raises ``InvalidInput`` with
    ``field`` ``line N.key`` for the first bad line; ids must be unique."""
    cases: list[Case] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"is not JSON: {exc}", field=where) from None
        if not isinstance(data, dict):
            raise InvalidInput("must be an object", field=where)
        unknown = sorted(set(data) - {"id", "input", "expect"})
        if unknown:
            raise InvalidInput("is not a case key", field=f"{where}.{unknown[0]}")
        case_id = data.get("id")
        if not isinstance(case_id, str) or not case_id or "|" in case_id:
            raise InvalidInput("must be a non-empty string without '|'", field=f"{where}.id")
        if case_id in seen:
            raise InvalidInput(f"duplicate id {case_id!r}", field=f"{where}.id")
        if "input" not in data:
            raise InvalidInput("is required", field=f"{where}.input")
        expect = data.get("expect", {})
        expectations_check(expect, field=f"{where}.expect")
        seen.add(case_id)
        cases.append(Case(id=case_id, input=data["input"], expect=expect))
    if not cases:
        raise InvalidInput("holds no case", field="cases")
    return cases


def input_merge(base: Any, override: dict[str, Any] | None) -> Any:
    """``base`` with the keys of ``override`` replaced (objects only): how a candidate
    prompt (``--override '{"system": "..."}'``) is tried on every case."""
    if not override:
        return base
    if not isinstance(base, dict):
        raise InvalidInput("applies to object inputs only", field="override")
    return {**base, **override}


def evaluation_run(
    *,
    cases: list[Case],
    agent: str,
    version: str | None = None,
    recording: Recording,
    override: dict[str, Any] | None = None,
    case_timeout: float = 60.0,
) -> dict[str, Any]:
    """Run every case and return the report::

        {"format": 1, "agent", "version", "mode": "replay" | "live", "started_at",
         "cases": [{"id", "passed", "score", "grades": [{"grader", "passed", "score",
                    "detail"}], "status", "answer", "tokens", "cost", "steps",
                    "duration_ms", "task_id", "error"}],
         "summary": {"cases", "passed", "failed", "tokens", "cost", "duration_ms"}}

    Cost is in the currency of the model's price (``AGENTS_LLM_MODELS``), as a float.
    Raises ``InvalidInput`` (field ``version``) if this code's agent is not ``version``.
    A case whose task does not end within ``case_timeout`` seconds (retries waiting)
    is reported with its status at that point and fails.
    """
    definition = get_agent(agent)
    if version is not None and str(version) != str(definition.version):
        raise InvalidInput(
            f"this code has {agent!r} version {definition.version}, not {version}",
            field="version",
        )
    owner = service_user(OWNER)
    results = []
    # The tasks run on this process's code, so they are pinned to its version.
    with chat_transport(recording), _replay_model_settings(recording), local_intake():
        for case in cases:
            recording.case = case.id
            results.append(_case_run(case, agent, owner, override, case_timeout))
            recording.save()
    return {
        "format": REPORT_FORMAT,
        "agent": agent,
        "version": str(definition.version),
        "mode": "live" if recording.live else "replay",
        "started_at": timezone.now().isoformat(),
        "cases": results,
        "summary": {
            "cases": len(results),
            "passed": sum(r["passed"] for r in results),
            "failed": sum(not r["passed"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "cost": round(sum(r["cost"] for r in results), 8),
            "duration_ms": round(sum(r["duration_ms"] for r in results), 3),
        },
    }


class _replay_model_settings:  # noqa: N801 (a context manager, used as one)
    """In replay no server is needed, but the llm agent still looks up its model's
    settings (name, price): with no server configured, a placeholder URL that is never
    contacted is used, and the recording's model as the default model."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        self.saved: dict[str, Any] | None = None

    def __enter__(self) -> None:
        conf = settings.LLM
        if self.recording.live or conf["BASE_URL"]:
            return
        self.saved = dict(conf)
        models = sorted(self.recording.models())
        conf["BASE_URL"] = "http://replay.invalid/v1"
        conf["MODEL"] = conf["MODEL"] or (models[0] if models else "replay")

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            settings.LLM.clear()
            settings.LLM.update(self.saved)


def _case_run(
    case: Case, agent: str, owner: Any, override: dict[str, Any] | None, timeout: float
) -> dict[str, Any]:
    started = time.monotonic()
    error = ""
    task: AgentTask | None = None
    try:
        with dispatch.publishes_collected() as queue:
            task, _ = task_start(owner=owner, agent=agent, input=input_merge(case.input, override))
            _drive(task, queue, deadline=started + timeout)
        task.refresh_from_db()
    except InvalidInput as exc:
        error = f"{exc.field}: {exc}"
    duration_ms = round((time.monotonic() - started) * 1000, 3)
    run = _run_of(task, error)
    grades = grades_for(run, case.expect)
    return {
        "id": case.id,
        "passed": all(g.passed for g in grades),
        "score": round(sum(g.score for g in grades) / len(grades), 4),
        "grades": [asdict(g) for g in grades],
        "status": run.status,
        "answer": run.answer,
        "tokens": run.tokens,
        "cost": float(run.cost),
        "steps": run.steps,
        "tools": run.tools,
        "duration_ms": duration_ms,
        "task_id": run.task_id,
        "error": run.error,
    }


def _drive(task: AgentTask, queue: list[Any], *, deadline: float) -> None:
    """Execute the collected publishes until the task stops being runnable; a retry
    pending is waited for (on the database's clock, as the scheduler would) and
    published again, into the same collector."""
    while time.monotonic() < deadline:
        while queue:
            task_id, step = queue.pop(0)
            step_execute(task_id=task_id, step=step, node="evaluate")
        task.refresh_from_db(fields=("status", "retry_at", "current_step"))
        if task.status not in RUNNABLE:
            return
        if task.retry_at is None:
            return  # nothing left to run (a refused step): reported as it stands
        time.sleep(max(0.0, min((task.retry_at - timezone.now()).total_seconds(), 1.0)))
        _retry_fire(task)


def _retry_fire(task: AgentTask) -> None:
    with transaction.atomic():
        locked = AgentTask.objects.select_for_update().defer("input", "result").get(pk=task.pk)
        if locked.retry_at is None or locked.retry_at > timezone.now():
            return
        locked.retry_at = None
        dispatch.current_step_publish(task=locked)
        locked.save(update_fields=("retry_at", "in_flight"))


def _run_of(task: AgentTask | None, error: str) -> Run:
    if task is None:
        return Run(status="refused", result=None, error=error, steps=0, tokens=0, cost=Decimal(0))
    usage = ModelCall.objects.filter(task=task).aggregate(
        tokens=Sum("total_tokens"), cost=Sum("cost")
    )
    tools = [
        e["tool"]
        for e in AuditEvent.objects.filter(task=task, type=EventType.TOOL_CALL)
        .order_by("seq")
        .values_list("payload", flat=True)
    ]
    return Run(
        status=task.status,
        result=task.result,
        error=task.error or error,
        steps=Checkpoint.objects.filter(task=task, step__gt=0).count(),
        tokens=usage["tokens"] or 0,
        cost=usage["cost"] or Decimal(0),
        tools=tools,
        task_id=str(task.pk),
    )


def report_compare(*, report: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Compare ``report`` with ``baseline`` (an earlier report) case by case::

        {"regressions": [id], "fixes": [id], "new": [id], "missing": [id],
         "tokens_delta": int, "cost_delta": float,
         "cases": {id: {"was": bool | None, "now": bool | None, "tokens_delta",
                        "cost_delta"}}}

    A regression is a case that passed in the baseline and now fails, or is no longer
    in the run; a fix is one that failed and now passes. The comparison is stored in
    ``report["baseline"]``, and returned."""
    before = {c["id"]: c for c in baseline.get("cases", [])}
    after = {c["id"]: c for c in report["cases"]}
    cases: dict[str, Any] = {}
    for case_id in [*after, *(k for k in before if k not in after)]:
        was, now = before.get(case_id), after.get(case_id)
        cases[case_id] = {
            "was": was["passed"] if was else None,
            "now": now["passed"] if now else None,
            "tokens_delta": (now["tokens"] if now else 0) - (was["tokens"] if was else 0),
            "cost_delta": round((now["cost"] if now else 0) - (was["cost"] if was else 0), 8),
        }
    comparison = {
        "regressions": [k for k, c in cases.items() if c["was"] and not c["now"]],
        "fixes": [k for k, c in cases.items() if c["was"] is False and c["now"]],
        "new": [k for k, c in cases.items() if c["was"] is None],
        "missing": [k for k, c in cases.items() if c["now"] is None],
        "tokens_delta": report["summary"]["tokens"] - baseline.get("summary", {}).get("tokens", 0),
        "cost_delta": round(
            report["summary"]["cost"] - baseline.get("summary", {}).get("cost", 0), 8
        ),
        "baseline_version": baseline.get("version"),
        "cases": cases,
    }
    report["baseline"] = comparison
    return comparison


def report_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table, one case a line, then the summary and (when
    compared) the regressions and fixes."""
    comparison = report.get("baseline") or {}
    rows = [("case", "result", "score", "tokens", "cost", "steps", "ms", "vs baseline")]
    for case in report["cases"]:
        delta = (comparison.get("cases") or {}).get(case["id"])
        change = ""
        if delta is not None:
            if case["id"] in comparison["regressions"]:
                change = "REGRESSION"
            elif case["id"] in comparison["fixes"]:
                change = "fixed"
            elif delta["was"] is None:
                change = "new"
            change += f" {delta['tokens_delta']:+d} tok {delta['cost_delta']:+.6f}"
        rows.append(
            (
                case["id"],
                "pass" if case["passed"] else "FAIL",
                f"{case['score']:.2f}",
                str(case["tokens"]),
                f"{case['cost']:.6f}",
                str(case["steps"]),
                f"{case['duration_ms']:.0f}",
                change.strip(),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    for case in report["cases"]:
        for grade in case["grades"]:
            if not grade["passed"]:
                lines.append(f"  {case['id']}: {grade['grader']}: {grade['detail']}")
    s = report["summary"]
    lines.append(
        f"{report['agent']} {report['version']} ({report['mode']}): {s['passed']}/{s['cases']} "
        f"passed, {s['tokens']} tokens, cost {s['cost']:.6f}"
    )
    if comparison:
        lines.append(
            f"against the baseline ({comparison['baseline_version']}): "
            f"{len(comparison['regressions'])} regression(s) "
            f"{', '.join(comparison['regressions'])}; {len(comparison['fixes'])} fix(es) "
            f"{', '.join(comparison['fixes'])}; tokens {comparison['tokens_delta']:+d}, "
            f"cost {comparison['cost_delta']:+.6f}"
        )
    return "\n".join(line.rstrip() for line in lines)
