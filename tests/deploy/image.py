"""bin/validate-image: build docker/Dockerfile with podman and run the image as
docker/compose.yaml runs it, against this machine's PostgreSQL, RabbitMQ and Redis.

1. The base. The Dockerfile's ``FROM`` (the official Python image) is used when it is
   in the image store or can be pulled. Where no registry is reachable, a stand-in is
   made once and kept: Debian's own release of the same suite from ``debootstrap``
   (python3, python3-venv, ca-certificates, netbase, tzdata), ``python3 -m venv
   /usr/local`` so that ``python`` and ``pip`` are where the official image has them,
   the machine's extra CA certificates and pip's index settings (so that pip in the
   build reaches the package index as the machine does), imported under the ``FROM``
   name. Its label holds a digest of that recipe: a change makes a new one.
2. The build: ``podman build`` of the repository root, host networking, no pull; the
   layers are kept in the store, so a rebuild reuses them.
3. The run, as compose would: ``docker/make-env.py`` writes the env file, compose.yaml
   is read and interpolated from it (a required variable it lacks fails here), and
   migrate, web, worker and flower run with compose's commands and environments. Only
   the addresses of compose's postgres, rabbitmq and redis services change (to a
   private database, this machine's broker and Redis), and a private namespace is
   added (queue names, Redis key prefix). Host networking: the ports are compose's, so
   they must be free here, and one worker replica runs (two would share a port).
4. The checks: migrate exits 0; each service's compose healthcheck passes, run inside
   its container (with its environment) within compose's own patience; a user and a
   token made with manage.py in the web container; a ``scripted`` task created through
   the API completes; ``/metrics`` answers the token Prometheus is configured with
   (docker/prometheus/prometheus.yml's credentials file, filled by compose's secret);
   the Kubernetes probes' requests (docker/k8s) get 200; the worker stops gracefully
   (exit 0) on compose's stop signal.
5. Clean-up, also on failure or a signal: every container it started, the env file,
   the private database, queues and Redis keys.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from llm.testing.chat_server import ChatServer
from tests.deploy import compose, podman, services

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
# The app's services that the test runs, in compose's start-up order after migrate.
LONG_RUNNING = ("web", "worker", "llm-gateway", "flower")
# compose services whose addresses this machine's servers replace.
BACKING = ("postgres", "rabbitmq", "redis")
STAND_IN_LABEL = "agents.stand-in-base"
# Bump when the stand-in's recipe below changes.
STAND_IN_RECIPE = "1: debootstrap minbase + python3 python3-venv ca-certificates netbase tzdata"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates,netbase,tzdata"
HOST_CA = Path("/usr/local/share/ca-certificates")
PIP_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def step(message: str) -> None:
    print(f"validate-image: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[what] = time.monotonic() - start
        step(f"{what}: {timings[what]:.1f} s")


# --- 1. The base ------------------------------------------------------------------------


def base_image() -> str:
    """The ``FROM`` of every stage, fully qualified as Docker reads a short name."""
    bases = set(re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE))
    bases -= {"scratch"}
    if len(bases) != 1:
        raise AssertionError(f"expected one base image in docker/Dockerfile, got {bases}")
    name = bases.pop()
    if "/" not in name.split(":")[0]:
        name = f"docker.io/library/{name}"
    return name


def _pip_settings() -> dict[str, str]:
    """The host pip's index settings that a container can use (http(s) URLs only)."""
    found = {}
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(variable):
            found[variable] = os.environ[variable]
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    options = {"index-url": "PIP_INDEX_URL", "extra-index-url": "PIP_EXTRA_INDEX_URL"}
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        variable = options.get(key.rsplit(".", 1)[-1], "")
        if variable and variable not in found:
            urls = [u for u in value.strip("'\"").split() if u.startswith(("http:", "https:"))]
            if urls:
                found[variable] = " ".join(urls)
    return found


def _stand_in_key(pip: dict[str, str]) -> str:
    digest = hashlib.sha256(STAND_IN_RECIPE.encode())
    for cert in sorted(HOST_CA.rglob("*.crt")) if HOST_CA.is_dir() else []:
        digest.update(cert.name.encode() + cert.read_bytes())
    digest.update(json.dumps(pip, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _image_labels(name: str, env: dict[str, str]) -> dict[str, str] | None:
    found = podman.podman("image", "inspect", name, env=env, check=False)
    if found.returncode != 0:
        return None
    return json.loads(found.stdout)[0].get("Labels") or {}


def ensure_base(env: dict[str, str], cache: Path) -> str:
    """The base image in the store; returns how it got there. One run at a time makes
    it (another waits, then finds it made)."""
    with (cache / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_base(env, cache)


def _ensure_base(env: dict[str, str], cache: Path) -> str:
    name = base_image()
    pip = _pip_settings()
    key = _stand_in_key(pip)
    labels = _image_labels(name, env)
    if labels is not None and STAND_IN_LABEL not in labels:
        return f"{name}: the official image, in the store"
    if labels is not None and labels[STAND_IN_LABEL] == key:
        return f"{name}: the stand-in made earlier (key {key})"
    if labels is None:
        pulled = podman.podman("pull", name, env=env, timeout=600, check=False)
        if pulled.returncode == 0:
            return f"{name}: pulled"
        step(f"cannot pull {name} ({pulled.stderr.strip().splitlines()[-1:]}): a stand-in")
    _make_stand_in(name, key, pip, env, cache)
    return f"{name}: a stand-in made now with debootstrap (key {key})"


def _suite(name: str) -> str:
    tag = name.rsplit(":", 1)[-1]
    for suite in ("bookworm", "trixie", "bullseye"):
        if suite in tag:
            return suite
    raise AssertionError(f"{name}: no Debian suite in its tag, cannot make a stand-in")


def _unmount_under(root: Path) -> None:
    """What an interrupted debootstrap left mounted (its /proc, /sys) in the root."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if line.split()[1].startswith(f"{root}/")]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True)


def _make_stand_in(
    name: str, key: str, pip: dict[str, str], env: dict[str, str], cache: Path
) -> None:
    if shutil.which("debootstrap") is None:
        raise podman.PodmanMissing("debootstrap missing: apt-get install debootstrap")
    rootfs = Path(tempfile.mkdtemp(prefix="stand-in-", dir=cache))
    # debootstrap's own default mirror unless AGENTS_IMAGE_DEBIAN_MIRROR names one.
    mirror = os.environ.get("AGENTS_IMAGE_DEBIAN_MIRROR", "")
    command = [
        "debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}",
        _suite(name), str(rootfs), *([mirror] if mirror else []),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        if HOST_CA.is_dir():
            shutil.copytree(HOST_CA, rootfs / HOST_CA.relative_to("/"), dirs_exist_ok=True)
        for argv in (["update-ca-certificates"], ["python3", "-m", "venv", "/usr/local"]):
            done = subprocess.run(
                ["chroot", str(rootfs), *argv], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise RuntimeError(f"{argv} in the stand-in failed:\n{done.stderr[-3000:]}")
        # What the official image does not carry: the venv's activate scripts, apt's
        # package lists and downloaded packages.
        for leftover in (
            "usr/local/bin/activate*", "usr/local/bin/Activate.ps1",
            "var/lib/apt/lists/*_*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
        ):  # fmt: skip
            for path in rootfs.glob(leftover):
                path.unlink()
        changes = {
            "PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "PIP_CERT": PIP_CA_BUNDLE,
            **pip,
        }
        argv = ["import"]
        for variable, value in changes.items():
            argv += ["--change", f"ENV {variable}={value}"]
        argv += ["--change", f"LABEL {STAND_IN_LABEL}={key}", "--change", 'CMD ["python3"]']
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        podman.podman(*argv, "-", name, env=env, input=tar.stdout, timeout=600)
    finally:
        _unmount_under(rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)


# --- 2. The build -----------------------------------------------------------------------


def build(env: dict[str, str], tag: str, workdir: Path) -> str:
    iidfile = workdir / "iid"
    done = podman.podman(
        "build", "--pull=never", "--network=host", "--layers", "--iidfile", iidfile,
        "-f", DOCKERFILE, "-t", tag, ROOT,
        env=env, timeout=1200, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"the image does not build:\n{done.stdout[-6000:]}{done.stderr}")
    # Untagged images of builds older than a day: the store stays bounded, and today's
    # layers (the wheel stage's too) stay for the next build.
    podman.podman("image", "prune", "--force", "--filter", "until=24h", env=env, check=False)
    return iidfile.read_text().strip()


# --- 3. The run -------------------------------------------------------------------------


def make_env_file() -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, str(DOCKER / "make-env.py")], capture_output=True, text=True, check=True
    )
    return compose.read_env_file(done.stdout)


def _replace_address(url: str, replacement: str, service: str) -> str:
    """compose's URL of a backing service, which must name that service's host."""
    host = urlsplit(url).hostname
    if host != service:
        raise AssertionError(f"expected a URL of compose's {service} service, got {url!r}")
    return replacement


def container_environment(
    service: compose.Service, ns: services.Namespace, model_url: str = ""
) -> dict[str, str]:
    """compose's environment of the service, with the backing services' addresses
    replaced and the run's namespace added; no other address may remain. ``model_url``:
    the scripted chat server on loopback, as the model server (model ``scripted``)."""
    env = dict(service.environment)
    replacements = {
        "DATABASE_URL": (ns.database_url, "postgres"),
        "CELERY_BROKER_URL": (ns.broker_url, "rabbitmq"),
        "REDIS_URL": (ns.redis_url, "redis"),
    }
    for variable, (url, host) in replacements.items():
        if variable in env:
            env[variable] = _replace_address(env[variable], url, host)
    # The app's role (docker/compose.yaml: agents_app), made by migrate's db_app_role.
    for variable in ("DATABASE_URL", "APP_DATABASE_URL"):
        if urlsplit(service.environment.get(variable, "")).username == "agents_app":
            env[variable] = _replace_address(
                service.environment[variable], ns.app_database_url, "postgres"
            )
    for variable, value in env.items():
        if "://" in value and urlsplit(value).hostname in BACKING:
            raise AssertionError(f"{service.name}: {variable} names a compose service: {value}")
    env.update(ns.queues)
    if model_url and "AGENTS_LLM_BASE_URL" in env:
        env |= {"AGENTS_LLM_BASE_URL": model_url, "AGENTS_LLM_MODEL": "scripted"}
    return env


def _free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ports(service: compose.Service) -> list[int]:
    ports = [int(p.rsplit(":", 1)[-1].split("/")[0]) for p in service.ports]
    for variable in ("AGENTS_WORKER_HEALTH_PORT", "AGENTS_METRICS_PORT"):
        if service.environment.get(variable, "0") not in ("", "0"):
            ports.append(int(service.environment[variable]))
    return ports


class Run:
    """The containers of one run, named after its namespace; removed by ``close``."""

    def __init__(self, env: dict[str, str], image: str, ns: services.Namespace, workdir: Path):
        self.env, self.image, self.ns, self.workdir = env, image, ns, workdir
        self.started: list[str] = []

    def name(self, service: str) -> str:
        return f"agents-image-{self.ns.name}-{service}".replace("_", "-")

    def _env_file(self, service: str, environment: dict[str, str]) -> Path:
        path = self.workdir / f"{service}.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in environment.items()))
        path.chmod(0o600)
        return path

    def _run_args(self, service: compose.Service, environment: dict[str, str]) -> list[str]:
        args = ["--name", self.name(service.name), "--network=host", "--pull=never"]
        args += ["--env-file", str(self._env_file(service.name, environment))]
        if service.stop_signal:
            args += ["--stop-signal", service.stop_signal]
        args += ["--stop-timeout", str(int(service.stop_grace))]
        return [*args, self.image, *(service.command or [])]

    def once(self, service: compose.Service, environment: dict[str, str]) -> str:
        self.started.append(self.name(service.name))
        done = podman.podman(
            "run", *self._run_args(service, environment), env=self.env, timeout=600, check=False
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{service.name} exited {done.returncode}:\n{done.stdout[-4000:]}"
                f"{done.stderr[-4000:]}"
            )
        return done.stdout

    def start(self, service: compose.Service, environment: dict[str, str]) -> None:
        self.started.append(self.name(service.name))
        podman.podman("run", "--detach", *self._run_args(service, environment), env=self.env)

    def running(self, service: str) -> bool:
        state = podman.podman(
            "inspect", "--format", "{{.State.Running}}", self.name(service),
            env=self.env, check=False,
        )  # fmt: skip
        return state.stdout.strip() == "true"

    def exec(self, service: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman.podman(
            "exec", self.name(service), *argv, env=self.env, timeout=timeout, check=False
        )

    def logs(self, service: str, lines: int = 60) -> str:
        done = podman.podman(
            "logs", "--tail", str(lines), self.name(service), env=self.env, check=False
        )
        return done.stdout + done.stderr

    def wait_healthy(self, service: compose.Service) -> float:
        """compose's healthcheck, run in the container until it passes or compose's
        patience (start period plus interval times retries) runs out."""
        check = service.healthcheck
        assert check is not None, f"{service.name} has no healthcheck in compose.yaml"
        start = time.monotonic()
        deadline = start + check.patience
        last = ""
        while True:
            if not self.running(service.name):
                raise AssertionError(
                    f"{service.name} stopped before it was healthy:\n{self.logs(service.name)}"
                )
            try:
                done = self.exec(service.name, *check.test, timeout=check.timeout + 5)
                if done.returncode == 0:
                    return time.monotonic() - start
                last = done.stdout[-1500:] + done.stderr[-1500:]
            except subprocess.TimeoutExpired:
                last = f"the healthcheck took longer than {check.timeout} s"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{service.name} unhealthy after {check.patience:.0f} s: {last}\n"
                    f"{self.logs(service.name)}"
                )
            time.sleep(min(check.interval, 2.0))

    def stop(self, service: compose.Service) -> int:
        podman.podman(
            "stop", "--time", str(int(service.stop_grace)), self.name(service.name),
            env=self.env, timeout=service.stop_grace + 60,
        )  # fmt: skip
        code = podman.podman(
            "inspect", "--format", "{{.State.ExitCode}}", self.name(service.name), env=self.env
        )
        return int(code.stdout.strip())

    def close(self) -> list[str]:
        problems = []
        for name in reversed(self.started):
            done = podman.podman(
                "rm", "--force", "--ignore", "--time", "10", name,
                env=self.env, timeout=120, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                problems.append(f"container {name}: {done.stderr.strip()}")
        return problems


# --- 4. The checks through HTTP -----------------------------------------------------------


def metrics_token(document: dict[str, Any], dotenv: dict[str, str]) -> str:
    """The token Prometheus sends: prometheus.yml's credentials file for the web job,
    which compose fills from a secret of the prometheus service."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "agents-web"]
    authorization = job["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer", authorization
    prometheus = document["services"]["prometheus"]
    mounts = [v.split(":") for v in prometheus["volumes"] if isinstance(v, str)]
    (config_path,) = [m[1] for m in mounts if m[0].endswith("prometheus.yml")]
    wanted = (Path(config_path).parent / authorization["credentials_file"]).as_posix()
    for secret in prometheus.get("secrets", []):
        source = secret if isinstance(secret, str) else secret["source"]
        target = f"/run/secrets/{source}" if isinstance(secret, str) else secret["target"]
        if target == wanted:
            return dotenv[document["secrets"][source]["environment"]]
    raise AssertionError(f"prometheus' credentials file {wanted} is no secret of its service")


def k8s_probes() -> list[tuple[str, str, dict[str, str]]]:
    """(container port name's number, path, headers) of every httpGet probe, with the
    Host the kubelet sends (the pod's IP) unless the probe names one."""
    probes = []
    for manifest in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    http = (container.get(kind) or {}).get("httpGet")
                    if not http:
                        continue
                    port = ports.get(http["port"], http["port"])
                    headers = {"Host": f"192.0.2.17:{port}"}
                    headers |= {h["name"]: h["value"] for h in http.get("httpHeaders", [])}
                    probes.append((f"{manifest.name} {kind}", f":{port}{http['path']}", headers))
    return probes


def api_token(run: Run) -> str:
    username = f"image-{run.ns.name}"[:150]
    made = run.exec(
        "web", "python", "manage.py", "createsuperuser", "--noinput",
        "--username", username, "--email", f"{username}@example.invalid",
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    token = run.exec("web", "python", "manage.py", "drf_create_token", username)
    assert token.returncode == 0, token.stdout + token.stderr
    key = re.search(r"Generated token (\w+) for user", token.stdout)
    assert key, token.stdout
    return key[1]


def api_task(web_port: int, token: str, body: dict[str, Any]) -> dict[str, Any]:
    """Start a task through the API and wait for it to end (120 s at most)."""
    base = f"http://127.0.0.1:{web_port}"
    headers = {"Authorization": f"Token {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        created = client.post("/api/tasks/", json=body)
        assert created.status_code == 201, (created.status_code, created.headers, created.text)
        task_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while True:
            task = client.get(f"/api/tasks/{task_id}/")
            assert task.status_code == 200, (task.status_code, task.text)
            found: dict[str, Any] = task.json()
            if found["status"] not in ("pending", "running"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} not done in 120 s: {found}")
            time.sleep(0.5)
    assert found["status"] == "completed", found
    return found


def check_metrics(web_port: int, token: str) -> None:
    url = f"http://127.0.0.1:{web_port}/metrics"
    refused = httpx.get(url, timeout=10)
    assert refused.status_code == 401, (refused.status_code, refused.text[:300])
    scraped = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert scraped.status_code == 200, (scraped.status_code, scraped.text[:300])
    assert 'agents_tasks{status="completed"}' in scraped.text, scraped.text[:2000]


def check_probes() -> list[str]:
    seen = []
    for label, where, headers in k8s_probes():
        response = httpx.get(f"http://127.0.0.1{where}", headers=headers, timeout=15)
        assert response.status_code == 200, (label, where, response.status_code, response.text)
        seen.append(f"{label} {where}")
    return seen


# --- The whole run ------------------------------------------------------------------------


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def clean_up(run: Run | None, ns: services.Namespace | None, workdir: Path) -> list[str]:
    """Each part is tried whatever happened to the others; a second signal cannot stop
    it halfway."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    problems = []
    try:
        problems += run.close() if run else []
    except Exception as exc:
        problems.append(f"containers: {exc}")
    try:
        problems += services.drop(ns) if ns else []
    except Exception as exc:
        problems.append(f"namespace: {exc}")
    shutil.rmtree(workdir, ignore_errors=True)
    return problems


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for signum in SIGNALS:
        signal.signal(signum, _interrupt)
    podman.require()
    timings: dict[str, float] = {}
    started = time.monotonic()
    env = podman.environment()
    workdir = Path(tempfile.mkdtemp(prefix="validate-image-"))
    workdir.chmod(0o700)
    run: Run | None = None
    ns: services.Namespace | None = None
    # The model: the scripted chat server on loopback (the containers share the host's
    # network); compose's environment sends every model call through llm-gateway.
    chat = ChatServer(script=[{"content": "through the gateway"}]).start()
    try:
        with timed("base image", timings):
            step(ensure_base(env, podman.CACHE))
        dotenv = make_env_file()
        apps, document = compose.load(DOCKER / "compose.yaml", dotenv)
        tag = apps["web"].image
        with timed(f"build {tag}", timings):
            image = build(env, tag, workdir)

        ns = services.namespace("image")
        run = Run(env, image, ns, workdir)
        services.create(ns)
        step(f"namespace {ns.name}: database {ns.database}, queues {ns.name}.agents.*")
        busy = [
            (name, port) for name in LONG_RUNNING for port in _ports(apps[name]) if not _free(port)
        ]
        if busy:
            raise AssertionError(
                f"ports in use on this machine: {busy}; the containers use host networking "
                "and compose's ports"
            )
        if apps["worker"].replicas > 1:
            step(f"worker: 1 of compose's {apps['worker'].replicas} replicas (host network)")
        with timed("migrate", timings):
            run.once(apps["migrate"], container_environment(apps["migrate"], ns))
        for name in LONG_RUNNING:
            run.start(apps[name], container_environment(apps[name], ns, chat.url))
        with timed("healthchecks", timings):
            for name in LONG_RUNNING:
                took = run.wait_healthy(apps[name])
                step(f"{name}: compose's healthcheck passed ({took:.1f} s)")
        web_port = _ports(apps["web"])[0]
        token = api_token(run)
        with timed("a task through the API", timings):
            script = [{"think": "in the image"}, {"final": "ok"}]
            task = api_task(web_port, token, {"agent": "scripted", "input": {"script": script}})
            assert task["result"] == "ok", task
            step(f"task {task['id']}: {task['status']}, result {task['result']!r}")
        with timed("an llm task through the model gateway", timings):
            task = api_task(web_port, token, {"agent": "llm", "input": {"prompt": "hello"}})
            assert task["result"] == {"answer": "through the gateway"}, task
            assert chat.count(task=task["id"]) == 1, chat.requests
            step(f"llm task {task['id']}: {task['status']}, the model asked once, by the gateway")
        check_metrics(web_port, metrics_token(document, dotenv))
        step("/metrics: 401 without the token, 200 with the one Prometheus is given")
        for probe in check_probes():
            step(f"Kubernetes probe {probe}: 200")
        with timed("worker's graceful stop", timings):
            code = run.stop(apps["worker"])
        assert code == 0, f"the worker exited {code} on {apps['worker'].stop_signal}"
    finally:
        problems = clean_up(run, ns, workdir)
        chat.stop()
        if problems:
            step("clean-up problems: " + "; ".join(problems))
    step(f"the image runs as compose runs it ({time.monotonic() - started:.0f} s in all)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
