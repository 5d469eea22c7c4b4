"""Every benchmark script starts: it imports the project's modules as they are now and
parses its arguments (``--help``). The benchmarks themselves run outside the suite
(``benchmarks/``); this catches one that a move of the code left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(
    path for path in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()
)


def test_the_benchmark_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"step_overhead.py", "recovery.py", "llm_conversation.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_starts(script: Path):
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout


def test_the_growth_benchmark_builds_measures_and_keeps_a_tiny_database(tmp_path: Path):
    """``growth.py`` at a tiny size: real runs replicated, every operation measured,
    bytes per task reported, the kept database's chains verify and hold what it says."""
    import json
    import os

    import psycopg

    namespace = os.environ["AGENTS_QUEUE"].split(".agents")[0].replace(".", "_").lower()
    prefix, kept = f"{namespace}_growthbench", f"{namespace}_growthbench_kept"
    server = os.environ["DATABASE_URL"].rsplit("/", 1)[0]
    out = tmp_path / "growth.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/growth.py", "--sizes", "3,60", "--repeat", "1"]
        + ["--json", str(out), "--prefix", prefix, "--keep", kept],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        figures = json.loads(out.read_text())["sizes"]
        assert set(figures) == {"3", "60"}
        for size in figures.values():
            assert set(size["ops"]) >= {
                "admin task list",
                "admin search error:refused",
                "admin page 100",
                "admin audit-event list",
                "API task list, operator",
                "API deep page, operator",
                "/metrics scrape",
                "scheduler tick",
                "audit_verify, 100,000-event task",
                "API audit page, one owner",
                "API messages page, one owner",
            }
            assert all(ms > 0 for ms in size["ops"].values())
            assert size["bytes_per_task"] > 1000
        with psycopg.connect(f"{server}/{kept}", autocommit=True) as conn:
            # 60 copies + the 3 real runs + the 100,000-event task.
            assert conn.execute("SELECT count(*) FROM agents_agenttask").fetchone()[0] == 64
            trail = conn.execute(
                "SELECT max(audit_seq) FROM agents_agenttask WHERE audit_seq < 1000"
            ).fetchone()[0]
            assert (
                conn.execute(
                    "SELECT count(*) FROM llm_message WHERE task_id = (SELECT task_id FROM"
                    " llm_message GROUP BY task_id ORDER BY count(*) DESC LIMIT 1)"
                ).fetchone()[0]
                == 5000
            )
            assert (
                conn.execute(
                    "SELECT count(*) FROM audit_auditevent WHERE octet_length(hash) = 32"
                ).fetchone()[0]
                == conn.execute("SELECT count(*) FROM audit_auditevent").fetchone()[0]
            )
            assert trail > 20
        # Every replicated chain was sealed by the project's code: audit_verify agrees.
        verify = subprocess.run(
            [sys.executable, "manage.py", "audit_verify", "--all"],
            cwd=BENCHMARKS.parent,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "DATABASE_URL": f"{server}/{kept}"},
        )
        assert verify.returncode == 0, verify.stderr[-2000:]
        assert "0 break(s)" in verify.stdout + verify.stderr
        # The kept database measured again, nothing built: the same operations.
        again = tmp_path / "again.json"
        measured = subprocess.run(
            [sys.executable, "benchmarks/growth.py", "--measure", kept, "--repeat", "1"]
            + ["--json", str(again), "--prefix", prefix],
            cwd=BENCHMARKS.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert measured.returncode == 0, measured.stderr[-3000:]
        remeasured = json.loads(again.read_text())["sizes"]
        assert list(remeasured) == ["60"]
        assert set(remeasured["60"]["ops"]) == set(figures["60"]["ops"])
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            for name in (kept, f"{prefix}_3", f"{prefix}_60"):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
