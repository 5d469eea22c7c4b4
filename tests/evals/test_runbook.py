"""RUNBOOK.md's "An agent is producing incorrect outputs" and "Roll back a deployment":
their command blocks, run as written by a shell, as an operator would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agents.models import VersionHold
from tests.evals.test_evaluate import SCRIPTED_CASES, write_cases
from tests.helpers import worker_env

pytestmark = pytest.mark.django_db(transaction=True)

RUNBOOK = Path(__file__).resolve().parents[2] / "RUNBOOK.md"


def procedure(title: str) -> str:
    """The ```sh block of the RUNBOOK section ``title``."""
    text = RUNBOOK.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"{title}: one sh block expected"
    return blocks[0]


def run(script: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **worker_env(),
        **variables,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=RUNBOOK.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_incorrect_outputs_procedure_passes_then_names_a_regression(tmp_path):
    cases = write_cases(tmp_path / "cases.jsonl", SCRIPTED_CASES)
    baseline, report = tmp_path / "baseline.json", tmp_path / "report.json"
    saved = run(
        'python manage.py evaluate "$CASES" --agent scripted --save-baseline "$BASELINE"',
        CASES=str(cases),
        BASELINE=str(baseline),
    )
    assert saved.returncode == 0, saved.stdout + saved.stderr
    variables = {
        "AGENT": "scripted",
        "CASES": str(cases),
        "BASELINE": str(baseline),
        "REPORT": str(report),
    }
    steps = procedure("An agent is producing incorrect outputs")
    done = run(steps, **variables)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 regression(s)" in done.stdout
    assert "scripted  1.0" in done.stdout  # step 1: the versions listing

    worse = [dict(SCRIPTED_CASES[0], input={"script": [{"final": "41"}]}), SCRIPTED_CASES[1]]
    write_cases(cases, worse)
    failed = run(steps, **variables)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert json.loads(report.read_text())["baseline"]["regressions"] == ["calc-then-final"]


def test_rollback_procedure_holds_the_version_and_shows_it():
    done = run(procedure("Roll back a deployment"), AGENT="scripted", VERSION="1.0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert VersionHold.objects.filter(agent="scripted", version="1.0").exists()
    assert "scripted 1.0 takes no new tasks" in done.stdout
    assert re.search(r"scripted\s+1\.0\s+held", done.stdout), done.stdout
