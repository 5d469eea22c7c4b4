"""The README's first command: the zero-setup demo, on SQLite and the embedded broker."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _demo_env(var_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTS_", "DATABASE_", "CELERY_", "REDIS_"))
    }
    env["AGENTS_VAR_DIR"] = str(var_dir)
    return env


def _demo(var_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "demo"],
        cwd=ROOT,
        env=_demo_env(var_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _tasks(var_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(var_dir / "agents.sqlite3", timeout=30) as db:
        return db.execute("select id, status, current_step from agents_agenttask").fetchall()


def test_the_demo_completes_and_prints_a_timeline(tmp_path):
    demo = _demo(tmp_path)
    out, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, out
    assert ": completed" in out
    assert "Refunded 64.77 to customer 42." in out
    assert "Ledger rows written by this task: 1" in out
    timeline = out.split("Timeline")[1]
    for expected in ("reasoning", "tool_call", "tool_result", "approval_decided", "(resumed)"):
        assert expected in timeline


def test_a_demo_killed_mid_run_resumes_the_same_task(tmp_path):
    demo = _demo(tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if (tmp_path / "agents.sqlite3").exists():
            try:
                rows = _tasks(tmp_path)
            except sqlite3.OperationalError:
                continue
            # Step 5 sleeps for a second: kill the demo (and so its worker) during it.
            if rows and rows[0][1] == "running" and rows[0][2] == 5:
                break
    else:
        pytest.fail("the demo task never reached step 5")
    os.killpg(demo.pid, signal.SIGKILL)
    demo.wait()
    time.sleep(2)  # a pool child may still finish the step it had; nothing consumes after
    (task_id, status, step) = _tasks(tmp_path)[0]
    assert status == "running" and step in (5, 6)

    again = _demo(tmp_path)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert "Resuming task" in out
    rows = _tasks(tmp_path)
    assert len(rows) == 1, "resumed, not started over"
    assert rows[0][0] == task_id and rows[0][1] == "completed"
    with sqlite3.connect(tmp_path / "agents.sqlite3") as db:
        ledger = db.execute("select count(*) from tools_ledgerentry").fetchone()[0]
        steps = [
            r[0]
            for r in db.execute(
                "select step from agents_checkpoint where task_id = ? order by step", (task_id,)
            )
        ]
    assert ledger == 1
    assert steps == list(range(9))


def test_the_supervisor_demo_fans_out_uses_an_mcp_tool_and_edits_an_approval(tmp_path):
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--supervisor"],
        cwd=ROOT,
        env=_demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, _ = demo.communicate(timeout=180)
    assert demo.returncode == 0, out
    assert "Registered the MCP server 'time'" in out
    timeline = out.split("Joint timeline")[1]
    for expected in (
        "supervisor step 2   children_started",
        'mcp:time/get_current_time(timezone="Europe/Berlin")',
        "approval_decided edited by user:manager (replace /key",
        'ledger.append(key="refund:customer-42:receipt-7781"',
        "supervisor step 3   transition       running -> completed",
    ):
        assert expected in timeline, expected
    assert "Ledger rows written by the children: ['refund:customer-42:receipt-7781']" in out
    with sqlite3.connect(tmp_path / "agents.sqlite3", timeout=30) as db:
        rows = db.execute(
            "select status, parent_id is null from agents_agenttask order by created_at"
        ).fetchall()
    assert sorted(rows) == [("completed", 0), ("completed", 0), ("completed", 1)]
