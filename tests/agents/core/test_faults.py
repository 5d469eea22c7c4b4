"""Fault injection exists for the crash tests only: production settings refuse it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.core.faults import parse

ROOT = Path(__file__).resolve().parents[3]


def _settings_with(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "agents_project.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("environment", ["production", "development"])
def test_fault_injection_is_refused_outside_tests(environment):
    refused = _settings_with(AGENTS_FAULT_INJECTION="after_commit", AGENTS_ENVIRONMENT=environment)
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr
    assert "AGENTS_FAULT_INJECTION" in refused.stderr


def test_fault_injection_is_accepted_in_tests_and_off_by_default():
    assert (
        _settings_with(AGENTS_FAULT_INJECTION="after_commit", AGENTS_ENVIRONMENT="test").returncode
        == 0
    )
    assert _settings_with().returncode == 0


def test_fault_points_are_named():
    assert parse("after_publish@3") == ("after_publish", 3)
    assert parse("before_commit") == ("before_commit", None)
    with pytest.raises(ValueError, match="unknown point"):
        parse("somewhere")
