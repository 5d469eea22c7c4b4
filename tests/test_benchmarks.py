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
