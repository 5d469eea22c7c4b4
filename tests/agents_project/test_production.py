"""Issue 12, finding 8: production refuses public defaults; check --deploy is clean with
the documented production variables; kv.set has quotas per owner."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from cryptography.fernet import Fernet

from agents.errors import ToolArgumentError
from tools.builtin import kv_set_tool
from tools.models import KVEntry
from tools.registry import ToolContext

PRODUCTION = {
    "AGENTS_ENVIRONMENT": "production",
    "DJANGO_SECRET_KEY": "k3-" + "q9Zr7".join(str(i) for i in range(20)),
    "AGENTS_CREDENTIALS_KEY": Fernet.generate_key().decode(),
    "AGENTS_METRICS_TOKEN": "a-scrape-token",
    "AGENTS_AUDIT_KEY": "an-audit-key-for-tests-0123456789abcdef",
    "ALLOWED_HOSTS": "agents.example.com",
    "DJANGO_SETTINGS_MODULE": "agents_project.settings",
}


def manage(*args: str, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTS_", "DJANGO_"))}
    env.update({k: v for k, v in PRODUCTION.items() if k not in drop})
    env["AGENTS_VAR_DIR"] = os.environ["AGENTS_VAR_DIR"]
    return subprocess.run(
        [sys.executable, "manage.py", *args], env=env, capture_output=True, text=True
    )


def test_check_deploy_is_clean_with_the_documented_production_variables():
    checked = manage("check", "--deploy", "--fail-level", "WARNING")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("DJANGO_SECRET_KEY", "DJANGO_SECRET_KEY must be set in production"),
        ("AGENTS_CREDENTIALS_KEY", "AGENTS_CREDENTIALS_KEY must be set in production"),
        ("AGENTS_METRICS_TOKEN", "AGENTS_METRICS_TOKEN must be set in production"),
        ("AGENTS_AUDIT_KEY", "AGENTS_AUDIT_KEY must be set in production"),
    ],
)
def test_production_refuses_to_start_without_each_secret(missing, message):
    refused = manage("check", drop=(missing,))
    assert refused.returncode != 0
    assert message in refused.stderr


def _ctx(user) -> ToolContext:
    return ToolContext(task_id=uuid.uuid4(), owner_id=user.pk, step=1, call_index=0, timeout=5)


@pytest.mark.django_db
def test_kv_set_has_a_size_and_a_key_quota_per_owner(user, other_user, settings):
    settings.AGENTS = {**settings.AGENTS, "KV_MAX_VALUE_BYTES": 100, "KV_MAX_KEYS": 3}
    with pytest.raises(ToolArgumentError, match="args.value"):
        kv_set_tool(_ctx(user), {"key": "big", "scope": "owner", "value": "x" * 200})
    for index in range(3):
        kv_set_tool(_ctx(user), {"key": f"k{index}", "scope": "owner", "value": index})
    with pytest.raises(ToolArgumentError, match="AGENTS_KV_MAX_KEYS"):
        kv_set_tool(_ctx(user), {"key": "k3", "scope": "owner", "value": 3})
    kv_set_tool(_ctx(user), {"key": "k0", "scope": "owner", "value": "replaced"})
    kv_set_tool(_ctx(other_user), {"key": "k3", "scope": "owner", "value": 3})
    assert KVEntry.objects.filter(owner=user).count() == 3
