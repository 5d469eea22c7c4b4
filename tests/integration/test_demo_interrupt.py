"""Ctrl-C on the demo: a short message, no traceback, and the next run resumes the task
with nothing but the task's story on the terminal (no raw log line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def demo(var_dir: Path) -> subprocess.Popen[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTS_", "DATABASE_", "CELERY_", "REDIS_"))
    }
    env["AGENTS_VAR_DIR"] = str(var_dir)
    return subprocess.Popen(
        [sys.executable, "manage.py", "demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As in a terminal: Ctrl-C raises KeyboardInterrupt (not ignored as in a job).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_prints_no_traceback_and_the_next_run_shows_no_log_lines(tmp_path):
    first = demo(tmp_path)
    assert first.stdout is not None
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("Started task"):
            first.send_signal(signal.SIGINT)
            break
    rest, _ = first.communicate(timeout=120)
    out = "".join(seen) + rest
    assert first.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "Interrupted. The task stays where it was" in out
    task_id = seen[-1].split()[-1]

    again = demo(tmp_path)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert f"Resuming task {task_id}" in out
    raw = [line for line in out.splitlines() if line.startswith("timestamp=")]
    assert raw == [], raw
    # The demo's own log lines (e.g. "stuck tasks published again" when it resumes a
    # task left pending) went to its log file instead.
    assert (tmp_path / "demo.log").exists()
