"""The image's build context (``docker build -f docker/Dockerfile .``) is the sources
and nothing else: .dockerignore leaves out secrets, virtualenvs, run-time data and the
leftovers of builds, and keeps every file the Dockerfile and the wheel need.

podman (as bin/validate-image runs it; .ci/run installs it) sends a copy of the
checkout, planted with each thing that must stay out, through the real .dockerignore to
a build that copies the whole context, and the files that reached the build are listed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import checkout, podman

# Each must stay out of the context: secrets, a virtualenv anywhere, run-time data,
# build and cache leftovers.
PLANTED = [
    "docker/.env",
    ".env",
    "deploy/prod.env",
    ".venv/lib/python3.11/site-packages/django/__init__.py",
    "tools/.venv/bin/python",
    "var/agents.sqlite3",
    "var/wt_abc123/logs/worker.log",
    ".git/config",
    "build/lib/agents/__init__.py",
    "dist/agent_runtime-0.1.0.tar.gz",
    "agent_runtime-0.1.0-py3-none-any.whl",
    "agent_runtime.egg-info/SOURCES.txt",
    "agents/__pycache__/models.cpython-311.pyc",
    ".pytest_cache/v/cache/lastfailed",
    ".mypy_cache/3.11/agents/models.data.json",
    ".ruff_cache/content",
    ".hypothesis/examples/x",
    "certs/server.key",
    "certs/server.pem",
]
# What the Dockerfile copies besides the packages (the packages: every file, below).
NEEDED = ["pyproject.toml", "README.md", "manage.py", "requirements.lock"]


def build_context(context: Path, out: Path) -> set[str]:
    podman.require()
    env = podman.environment()
    containerfile = context.parent / "Containerfile"
    containerfile.write_text("FROM scratch\nCOPY . /context/\n")
    iidfile = context.parent / "iid"
    podman.podman(
        "build", "--pull=never", "--layers=false", "--iidfile", iidfile,
        "-f", containerfile, "--output", f"type=local,dest={out}", context,
        env=env, timeout=300,
    )  # fmt: skip
    podman.podman("rmi", "--force", iidfile.read_text().strip(), env=env, check=False)
    root = out / "context"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.timeout(300)
def test_the_build_context_leaves_out_secrets_and_virtualenvs(tmp_path):
    context = checkout.copy_to(tmp_path / "context")
    assert (context / ".dockerignore").is_file()
    for name in PLANTED:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text("must not reach the build\n")

    sent = build_context(context, tmp_path / "out")

    assert sorted(set(PLANTED) & sent) == []
    assert not [name for name in sent if ".venv/" in name or name.startswith("var/")]
    assert set(NEEDED) <= sent
    shipped = checkout.project_apps() | {checkout.PROJECT_PACKAGE}
    package_files = {name for name in checkout.files() if name.split("/")[0] in shipped}
    assert package_files <= sent, sorted(package_files - sent)
    assert "docker/Dockerfile" in sent
