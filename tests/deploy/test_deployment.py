"""The deployment files pass the same offline checks CI runs (bin/validate-deploy), the
checks catch what they are for, and the image gets what it needs: a lock file it
installs from (the wheel it installs: test_wheel.py; the image built and run:
bin/validate-image)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy import lockcheck

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_every_deployment_check_passes():
    done = run(ROOT / "bin" / "validate-deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all deployment checks passed" in done.stderr


def test_the_compose_check_refuses_a_broken_start_up_order(tmp_path):
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.replace("service_completed_successfully", "service_done", 1))
    done = run(VENV_BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken)
    assert done.returncode != 0
    assert "service_done" in done.stdout


def test_the_manifest_check_refuses_an_unknown_field(tmp_path):
    worker = (ROOT / "docker" / "k8s" / "worker.yaml").read_text()
    broken = tmp_path / "worker.yaml"
    broken.write_text(worker.replace("terminationGracePeriodSeconds", "terminationGraceSeconds"))
    done = run(VENV_BIN / "kubernetes-validate", "--strict", broken)
    assert done.returncode != 0


def test_the_dockerfile_check_refuses_a_root_image(tmp_path):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(dockerfile.replace("USER 10001:10001", "USER root"))
    done = run(VENV_BIN / "hadolint", broken)
    assert done.returncode != 0
    assert "DL3002" in done.stdout  # "Last USER should not be root"


def test_compose_starts_in_order_with_healthchecks_and_restarts():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("postgres", "rabbitmq", "redis", "web", "worker", "flower"):
        assert "healthcheck" in services[name], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("web", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["rabbitmq"] == {"condition": "service_healthy"}
        assert services[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    # No secret has a default: compose refuses to start until docker/.env provides it.
    env = services["web"]["environment"]
    assert env["AGENTS_CREDENTIALS_KEY"].startswith("${AGENTS_CREDENTIALS_KEY:?")
    assert env["DJANGO_SECRET_KEY"].startswith("${DJANGO_SECRET_KEY:?")
    # Production refuses to start without it (migrate, web, workers and Flower exited).
    assert env["AGENTS_METRICS_TOKEN"].startswith("${AGENTS_METRICS_TOKEN:?")
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > int(services["worker"]["environment"]["AGENTS_SHUTDOWN_GRACE"])


def test_the_generated_env_file_has_a_real_credentials_key():
    from cryptography.fernet import Fernet

    done = run(sys.executable, ROOT / "docker" / "make-env.py")
    assert done.returncode == 0, done.stderr
    values = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if line and line[0] != "#"
    )
    Fernet(values["AGENTS_CREDENTIALS_KEY"])
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    # Every variable compose refuses to start without is generated.
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", compose))
    assert {"AGENTS_METRICS_TOKEN", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"} <= required
    assert {name for name in required if values.get(name)} == required


def test_the_image_installs_exactly_the_locked_versions():
    assert lockcheck.problems() == []
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "--only-binary=:all: --requirement requirements.lock" in dockerfile
    # The app itself from its wheel (tests/deploy/test_wheel.py), resolving nothing.
    assert "pip install --no-cache-dir --no-deps /wheels/*.whl" in dockerfile


def test_kubernetes_pins_its_image_and_bounds_every_container():
    for path in sorted((ROOT / "docker" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") not in ("Deployment", "Job"):
                continue
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, path
            for container in pod["containers"]:
                assert not container["image"].endswith(":latest"), path
                assert ":" in container["image"], path
                assert {"requests", "limits"} <= set(container["resources"]), path
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_web_probes_send_a_host_that_allowed_hosts_holds():
    """The kubelet sends the pod's IP as Host, which Django refuses (400): the web
    probes name localhost, and the Secret's documentation says to allow it."""
    web = next(yaml.safe_load_all((ROOT / "docker" / "k8s" / "web.yaml").read_text()))
    (container,) = web["spec"]["template"]["spec"]["containers"]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert {"name": "Host", "value": "localhost"} in probe["httpHeaders"], kind
    readme = (ROOT / "docker" / "k8s" / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `ALLOWED_HOSTS`")]
    assert "localhost" in row
    (row,) = [line for line in readme.splitlines() if line.startswith("| `AGENTS_METRICS_TOKEN`")]
    assert "optional" not in row


def test_web_and_workers_run_as_the_app_role_and_migrate_as_the_owner():
    """Issue 23: the app's own credentials cannot disable the audit trail's trigger."""

    def user_of(url: str) -> str:  # compose's text, before ${...} is substituted
        found = re.match(r"postgres://(\w+):", url)
        assert found, url
        return found.group(1)

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    migrate = services["migrate"]
    assert user_of(migrate["environment"]["DATABASE_URL"]) == "agents"
    assert user_of(migrate["environment"]["APP_DATABASE_URL"]) == "agents_app"
    assert "manage.py db_app_role" in " ".join(migrate["command"])
    for name in ("web", "worker", "flower", "llm-gateway", "audit-anchor"):
        env = services[name]["environment"]
        assert user_of(env["DATABASE_URL"]) == "agents_app", name
        assert env["AGENTS_AUDIT_KEY"].startswith("${AGENTS_AUDIT_KEY:?"), name
    # The anchor log is on a volume no other service mounts.
    anchors = [
        name
        for name, spec in services.items()
        if any(str(v).startswith("audit-anchors:") for v in spec.get("volumes", []))
    ]
    assert anchors == ["audit-anchor"]
    job = next(yaml.safe_load_all((ROOT / "docker" / "k8s" / "migrate-job.yaml").read_text()))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "manage.py db_app_role" in " ".join(container["command"])
    owner = {e["name"]: e for e in container["env"]}["DATABASE_URL"]
    assert owner["valueFrom"]["secretKeyRef"]["name"] == "agents-owner"
    for path in ("web.yaml", "worker.yaml", "llm-gateway.yaml", "audit-anchor.yaml"):
        for doc in yaml.safe_load_all((ROOT / "docker" / "k8s" / path).read_text()):
            if doc.get("kind") != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert "DATABASE_URL" not in {e["name"] for e in c.get("env", [])}, path
                assert "agents-owner" not in str(c), path


def test_the_image_serves_the_web_with_an_asgi_server():
    """Issue 23: an open event stream must not hold a sync worker."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD"))
    assert '"uvicorn", "agents_project.asgi:application"' in cmd
