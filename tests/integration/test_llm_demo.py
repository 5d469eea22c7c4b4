"""``bin/demo --llm`` from a fresh directory: SQLite, the embedded broker, a real worker
and the demo's own scripted chat-completions server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.test_demo import ROOT, _demo_env

pytestmark = pytest.mark.integration


def test_the_llm_demo_completes_against_its_scripted_model(tmp_path):
    demo = subprocess.run(
        [sys.executable, "manage.py", "demo", "--llm"],
        cwd=ROOT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out
    assert "SCRIPTED chat-completions server" in out
    assert ": completed" in out
    assert "Ledger rows written by this task: 1" in out
    assert "Model calls: 3" in out
    assert "model_call" in out and "approval_decided" in out
    # The replies stream (input "stream": true): printed piece by piece, then recorded.
    assert "step 4: the model is writing: Refunded 64.77 to customer 42" in out
