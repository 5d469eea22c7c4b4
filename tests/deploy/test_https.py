"""HTTPS in production, and the two documented ways to run without a redirect loop or a
redirect to nowhere (README, "Production settings"):

- ``SECURE_SSL_REDIRECT`` (on by default in production) redirects plain HTTP to
  https://, except the probes' and the scraper's paths;
- ``SECURE_SSL_REDIRECT=false`` serves plain HTTP: compose's default, on one host with
  no TLS terminator (http://localhost:8000), where every API call was a 301 before;
- ``SECURE_PROXY_SSL_HEADER_NAME=HTTP_X_FORWARDED_PROTO`` behind a proxy that
  terminates TLS: a request the proxy marks https is served, not redirected.

Each case is a process started with the production variables only, as a deployment
starts one; bin/validate-image runs compose's shape for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.deploy import compose

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "AGENTS_ENVIRONMENT": "production",
    "DJANGO_SECRET_KEY": "https-" + "Lm4q".join(str(i) for i in range(20)),
    "AGENTS_CREDENTIALS_KEY": Fernet.generate_key().decode(),
    "AGENTS_METRICS_TOKEN": "a-scrape-token-for-the-https-test",
    "AGENTS_AUDIT_KEY": "an-audit-key-for-tests-0123456789abcdef",
    "ALLOWED_HOSTS": "agents.example.com,localhost",
    "DJANGO_SETTINGS_MODULE": "agents_project.settings",
}
REQUESTS = """
import json, django
django.setup()
from django.test import Client
client = Client(HTTP_HOST="agents.example.com")
answers = {}
for path in ("/api/tasks/", "/healthz", "/metrics"):
    plain = client.get(path)
    proxied = client.get(path, HTTP_X_FORWARDED_PROTO="https")
    answers[path] = [plain.status_code, plain.get("Location"), proxied.status_code]
print(json.dumps(answers))
"""


def answers(tmp_path: Path, **settings: str) -> dict[str, list]:
    # Nothing of this test run's: no server (SQLite and the embedded broker suffice).
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(PRODUCTION, AGENTS_VAR_DIR=str(tmp_path), **settings)
    done = subprocess.run(
        [sys.executable, "-c", REQUESTS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_production_redirects_plain_http_except_probes_and_metrics(tmp_path):
    found = answers(tmp_path)
    assert found["/api/tasks/"][:2] == [301, "https://agents.example.com/api/tasks/"]
    assert found["/healthz"][0] == 200
    assert found["/metrics"][0] == 401  # not redirected: the token is what it wants


def test_ssl_redirect_off_serves_plain_http(tmp_path):
    found = answers(tmp_path, SECURE_SSL_REDIRECT="false")
    assert found["/api/tasks/"][0] == 401  # the API's own answer, not a redirect
    assert found["/healthz"][0] == 200


def test_behind_a_tls_proxy_a_request_it_marks_https_is_served(tmp_path):
    found = answers(tmp_path, SECURE_PROXY_SSL_HEADER_NAME="HTTP_X_FORWARDED_PROTO")
    plain_status, location, proxied_status = found["/api/tasks/"]
    assert (plain_status, location) == (301, "https://agents.example.com/api/tasks/")
    assert proxied_status == 401


@pytest.mark.parametrize("service", ["migrate", "web", "worker", "flower"])
def test_compose_serves_plain_http_unless_told_otherwise(service):
    generated = subprocess.run(
        [sys.executable, ROOT / "docker" / "make-env.py"], capture_output=True, text=True
    )
    services, _ = compose.load(ROOT / "docker" / "compose.yaml", compose.read_env_file(
        generated.stdout
    ))  # fmt: skip
    env = services[service].environment
    assert env["SECURE_SSL_REDIRECT"] == "false"
    assert env["SECURE_PROXY_SSL_HEADER_NAME"] == ""
    with_proxy = compose.read_env_file(generated.stdout) | {
        "SECURE_SSL_REDIRECT": "true",
        "SECURE_PROXY_SSL_HEADER_NAME": "HTTP_X_FORWARDED_PROTO",
    }
    services, _ = compose.load(ROOT / "docker" / "compose.yaml", with_proxy)
    env = services[service].environment
    assert env["SECURE_SSL_REDIRECT"] == "true"
    assert env["SECURE_PROXY_SSL_HEADER_NAME"] == "HTTP_X_FORWARDED_PROTO"


def test_check_deploy_in_compose_shape_warns_only_of_plain_http(tmp_path):
    """compose's own environment for web, as make-env.py fills it: the one thing
    check --deploy flags is the redirect left off on purpose."""
    generated = subprocess.run(
        [sys.executable, ROOT / "docker" / "make-env.py"], capture_output=True, text=True
    )
    services, _ = compose.load(
        ROOT / "docker" / "compose.yaml", compose.read_env_file(generated.stdout)
    )
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(services["web"].environment, AGENTS_VAR_DIR=str(tmp_path))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    (tmp_path / "metrics").mkdir()
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    flagged = re.findall(r"\(([a-z_.]+\.[EW]\d+)\)", done.stderr + done.stdout)
    assert flagged == ["security.W008"], done.stdout + done.stderr
