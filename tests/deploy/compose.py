"""docker/compose.yaml read as Docker Compose reads it, for bin/validate-image: YAML
anchors and merge keys, then ``${VAR}`` interpolation from the env file (``:-`` and
``-`` defaults, ``:?`` and ``?`` required, ``:+`` and ``+`` alternatives, ``$$``).
Only what the image test runs is modelled: a service's environment, command,
healthcheck and stop settings.

The interpolation environment is the env file alone (as if the shell set none of these
variables): the test runs what ``docker/make-env.py`` generates, whatever the caller's
shell holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is not set: compose refuses to start."""


def interpolate(value: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        is_set = name in env
        is_empty = not env.get(name)
        if op in (":-", "-"):
            use_default = is_empty if op == ":-" else not is_set
            return interpolate(arg, env) if use_default else env[name]
        if op in (":?", "?"):
            if is_empty if op == ":?" else not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op in (":+", "+"):
            use_alternative = not is_empty if op == ":+" else is_set
            return interpolate(arg, env) if use_alternative else ""
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def _resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, env) for value in node]
    return node


def read_env_file(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _seconds(duration: str | int | float | None, default: float) -> float:
    """A compose duration (``90s``, ``1m30s``, ``500ms``) in seconds."""
    if duration is None:
        return default
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total, found = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration):
        total += float(number) * units[unit]
        found = True
    if not found:
        raise ValueError(f"not a compose duration: {duration!r}")
    return total


@dataclass(frozen=True)
class Healthcheck:
    test: list[str]  # the command to exec in the container
    interval: float
    timeout: float
    retries: int
    start_period: float

    @property
    def patience(self) -> float:
        """How long compose waits before it calls the service unhealthy."""
        return self.start_period + self.interval * self.retries


@dataclass(frozen=True)
class Service:
    name: str
    image: str
    environment: dict[str, str]
    command: list[str] | None
    healthcheck: Healthcheck | None
    stop_signal: str | None
    stop_grace: float
    replicas: int
    ports: list[str] = field(default_factory=list)


def _healthcheck(spec: dict[str, Any] | None) -> Healthcheck | None:
    if not spec or spec.get("disable"):
        return None
    test = spec["test"]
    if isinstance(test, str):
        command = ["/bin/sh", "-c", test]
    elif test[0] == "CMD":
        command = list(test[1:])
    elif test[0] == "CMD-SHELL":
        command = ["/bin/sh", "-c", test[1]]
    else:
        raise ValueError(f"healthcheck test {test!r}: not CMD or CMD-SHELL")
    return Healthcheck(
        test=command,
        interval=_seconds(spec.get("interval"), 30),
        timeout=_seconds(spec.get("timeout"), 30),
        retries=int(spec.get("retries", 3)),
        start_period=_seconds(spec.get("start_period"), 0),
    )


def _environment(spec: dict[str, Any] | list[str] | None) -> dict[str, str]:
    if spec is None:
        return {}
    if isinstance(spec, list):
        pairs = [item.partition("=") for item in spec]
        return {key: value for key, _, value in pairs}
    # A key without a value takes the shell's, which this test does not have.
    return {key: "" if value is None else str(value) for key, value in spec.items()}


def load(path: Path, env: dict[str, str]) -> tuple[dict[str, Service], dict[str, Any]]:
    """The services, interpolated; and the whole file, interpolated (for what the
    services do not model: top-level secrets, the monitoring services' mounts)."""
    document = _resolve(yaml.safe_load(path.read_text()), env)
    services = {}
    for name, spec in document["services"].items():
        command = spec.get("command")
        services[name] = Service(
            name=name,
            image=spec.get("image", ""),
            environment=_environment(spec.get("environment")),
            command=command.split() if isinstance(command, str) else command,
            healthcheck=_healthcheck(spec.get("healthcheck")),
            stop_signal=spec.get("stop_signal"),
            stop_grace=_seconds(spec.get("stop_grace_period"), 10),
            replicas=int((spec.get("deploy") or {}).get("replicas", 1)),
            ports=[str(p) for p in spec.get("ports", [])],
        )
    return services, document
