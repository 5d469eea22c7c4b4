"""The shipped wheel is the whole app (issue 20): every app of ``INSTALLED_APPS`` with
every module, template and static file, and, installed into a fresh virtualenv outside
the checkout, it passes ``check --deploy`` in the production shape, migrates a database
of its own and runs a ``scripted`` task to completion on a real worker. The image
installs this same wheel (docker/Dockerfile).

How the fresh virtualenv gets the dependencies: the wheel is installed with
``--no-deps --no-index`` and the virtualenv reads the third-party packages of this
checkout's .venv through a ``.pth`` line naming a folder of links to them, made here,
which leaves out the project's own editable install (its ``__editable__`` finder and
``.pth``, its ``dist-info``). A ``.pth`` path line adds a folder to ``sys.path`` without
running the ``.pth`` files inside it, so the checkout is never importable; the test
still checks that every app is imported from the virtualenv and that nothing of the
checkout is on ``sys.path`` or in ``sys.modules``. A wheelhouse of every dependency
would prove no more about the project's own packages, and would download them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.deploy import checkout, services

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGE = checkout.PROJECT_PACKAGE
project_apps = checkout.project_apps
SCRIPT = {"script": [{"think": "from the wheel"}, {"final": "ok"}]}


def run(
    *argv: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = checkout.copy_to(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("wheel")
    done = run(sys.executable, "-m", "build", "--wheel", "--outdir", out, source, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_holds_every_app_and_nothing_else(wheel):
    """Built from the checkout's files (tests/deploy/checkout.py): no build/ leftovers."""
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("__init__.py")}
    assert {"agents", "evals", "llm", "rollout", "tools", "audit"} <= project_apps()
    assert top_level == project_apps() | {PROJECT_PACKAGE}


def test_the_wheel_holds_every_module_template_and_static_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [ROOT / package for package in sorted(project_apps() | {PROJECT_PACKAGE})]
    sources = {
        str(p.relative_to(ROOT))
        for package in shipped
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "agents/templates/admin/agents/agenttask/change_form.html" in sources
    assert "rollout/migrations/0001_initial.py" in sources
    assert sources <= names, sorted(sources - names)


def _dependencies_without_the_project(folder: Path) -> Path:
    """A folder of links to every entry of this .venv's site-packages except the project's
    own editable install."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    own = project_apps() | {PROJECT_PACKAGE}
    for entry in site.iterdir():
        name = entry.name
        if (
            name.startswith(("__editable__", "agent_runtime-"))
            or name.endswith(".pth")
            or name.split(".")[0] in own
        ):
            continue
        (folder / name).symlink_to(entry)
    return folder


@pytest.fixture
def fresh_venv(wheel: Path, tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    done = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    done = run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    deps = _dependencies_without_the_project(tmp_path / "deps")
    (Path(site.stdout.strip()) / "_dependencies.pth").write_text(f"{deps}\n")
    return venv


@pytest.fixture
def namespace() -> Iterator[services.Namespace]:
    with services.private("wheel") as ns:
        yield ns


def production_env(venv: Path, ns: services.Namespace, var: Path) -> dict[str, str]:
    """Only what a deployment sets: no PYTHONPATH, nothing of this test run."""
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(var),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": f"{PROJECT_PACKAGE}.settings",
        "AGENTS_ENVIRONMENT": "production",
        "DJANGO_SECRET_KEY": "wheel-" + "Zq8x".join(str(i) for i in range(20)),
        "AGENTS_CREDENTIALS_KEY": Fernet.generate_key().decode(),
        "AGENTS_METRICS_TOKEN": "a-scrape-token-for-the-wheel-test",
        "AGENTS_AUDIT_KEY": "an-audit-key-for-tests-0123456789abcdef",
        "ALLOWED_HOSTS": "agents.example.com",
        "AGENTS_VAR_DIR": str(var),
        "DATABASE_URL": ns.database_url,
        "CELERY_BROKER_URL": ns.broker_url,
        "REDIS_URL": ns.redis_url,
        **ns.queues,
    }


ORIGINS = """
import importlib.metadata, json, os, sys
import django
django.setup()
from django.apps import apps
print(json.dumps({
    "settings": sys.modules[os.environ["DJANGO_SETTINGS_MODULE"]].__file__,
    "apps": {c.name: c.path for c in apps.get_app_configs()},
    "modules": sorted(
        getattr(m, "__file__", None) or "" for m in list(sys.modules.values())
    ),
    "path": sys.path,
    "distribution": str(importlib.metadata.distribution("agent-runtime").locate_file("")),
}))
"""


@pytest.mark.timeout(600)
def test_the_installed_wheel_runs_a_task_from_a_fresh_virtualenv(fresh_venv, namespace, tmp_path):
    python = fresh_venv / "bin" / "python"
    work = tmp_path / "work"
    work.mkdir()
    env = production_env(fresh_venv, namespace, work)

    # Every app comes from the virtualenv; nothing of the checkout is importable.
    done = run(python, "-c", ORIGINS, cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    origins = json.loads(done.stdout)
    site = Path(origins["distribution"]).resolve()
    assert site.is_relative_to(fresh_venv.resolve()), site
    installed = {name: path for name, path in origins["apps"].items() if "." not in name}
    assert project_apps() <= set(installed)
    for name in project_apps():
        assert Path(installed[name]).resolve().is_relative_to(site), (name, installed[name])
    own = [ROOT / package for package in project_apps() | {PROJECT_PACKAGE}]
    from_checkout = [
        m for m in origins["modules"] if m and any(Path(m).resolve().is_relative_to(d) for d in own)
    ]
    assert from_checkout == []
    assert Path(origins["settings"]).resolve().is_relative_to(site), origins["settings"]
    assert not [p for p in origins["path"] if p and Path(p).resolve().is_relative_to(ROOT)]

    django = (python, "-m", "django")
    checked = run(*django, "check", "--deploy", "--fail-level", "WARNING", cwd=work, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no issues" in checked.stdout
    migrated = run(*django, "migrate", "--noinput", cwd=work, env=env)
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]

    log = work / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [python, "-m", "celery", "-A", PROJECT_PACKAGE, "worker", "--concurrency=1",
             f"--hostname={namespace.name}@%h", "--without-gossip", "--without-mingle",
             "--loglevel=INFO"],
            cwd=work, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        ran = run(
            *django, "run_agent", "scripted", "--input", json.dumps(SCRIPT), "--wait",
            cwd=work, env=env, timeout=180,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr + log.read_text()[-3000:]
        assert "status: completed" in ran.stdout
        assert 'result: "ok"' in ran.stdout
    finally:
        _stop(worker)
    assert worker.returncode == 0, log.read_text()[-3000:]


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a warm shutdown), then the whole process group if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
