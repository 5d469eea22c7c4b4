"""A placeholder credentials key is caught by ``check --deploy`` (and every start-up
check), not at the first ``credentials set``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parents[2]


def deploy_check(key: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AGENTS_ENVIRONMENT": "production",
        "AGENTS_CREDENTIALS_KEY": key,
        "AGENTS_METRICS_TOKEN": "a-scrape-token-for-this-test",
        "AGENTS_AUDIT_KEY": "an-audit-key-for-tests-0123456789abcdef",
        "DJANGO_SECRET_KEY": Fernet.generate_key().decode() * 2,
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "ERROR"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_placeholder_key_fails_the_deploy_check():
    refused = deploy_check("change-me-to-a-fernet-key")
    assert refused.returncode != 0
    assert "tools.E002" in refused.stderr
    assert "key 1 is not a Fernet key" in refused.stderr


def test_a_generated_key_passes_it():
    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    passed = deploy_check(f"{new},{old}")
    assert "tools.E002" not in passed.stderr
    assert passed.returncode == 0, passed.stderr
