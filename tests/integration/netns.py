"""Another machine on this one: a network namespace joined to the host by a veth pair.

A worker started with ``Host.prefix`` runs in the namespace, under its own host name
(its own UTS namespace, so the runtime cannot see its processes as local), and reaches
PostgreSQL, RabbitMQ and Redis only through the host end of the link, where a
``socat`` forwarder per service listens (``Host.env`` rewrites the URLs). ``cut``
takes the host end down: every packet between the namespace and the services is then
dropped, as behind a partition (nothing is refused or reset); ``restore`` brings it
back and the connections resume.

Needs root and ``ip``/``socat``; a machine that cannot make a namespace fails with the
reason (``NamespaceUnavailable``), it is never skipped. ``network_host`` removes the
namespace, the link, the forwarders and every process left in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


class NamespaceUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no ``ip``, no kernel
    support): the cross-host tests cannot run here."""


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespaceUnavailable(f"{' '.join(command)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace ``name``: its end ``ns_ip``, the host's end ``host_ip``."""

    name: str
    index: int
    forwarders: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def host_link(self) -> str:
        return f"{self.name[:10]}h"

    @property
    def ns_link(self) -> str:
        return f"{self.name[:10]}n"

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.index}.1"

    @property
    def ns_ip(self) -> str:
        return f"10.213.{self.index}.2"

    def prefix(self, hostname: str) -> tuple[str, ...]:
        """A command prefix that runs the rest in this namespace as host ``hostname``."""
        return (
            "ip",
            "netns",
            "exec",
            self.name,
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {hostname} && exec "$@"',
            "sh",
        )

    def forward(self, url: str) -> str:
        """Forward the service at ``url`` (a loopback host and port) from the host end
        of the link; returns the URL the namespace uses."""
        parts = urlsplit(url)
        port = parts.port or {"postgres": 5432, "amqp": 5672, "redis": 6379}[parts.scheme]
        target = parts.hostname or "127.0.0.1"
        self.forwarders.append(
            subprocess.Popen(
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind={self.host_ip},reuseaddr,fork",
                    f"TCP:{target}:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        netloc = parts.netloc.rsplit("@", 1)
        hostport = f"{self.host_ip}:{port}"
        netloc_new = f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport
        return urlunsplit(parts._replace(netloc=netloc_new))

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with its DATABASE_URL, CELERY_BROKER_URL and REDIS_URL reached
        through this namespace's link."""
        out = dict(env)
        for name in ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"):
            url = env.get(name) or os.environ.get(name)
            if url:
                out[name] = self.forward(url)
        time.sleep(0.3)  # the forwarders listen
        return out

    def cut(self) -> None:
        """Drop every packet between the namespace and the host, both ways."""
        _ip("link", "set", self.host_link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.host_link, "up")
        _ip("addr", "replace", f"{self.host_ip}/24", "dev", self.host_link)

    def _close(self) -> None:
        for forwarder in self.forwarders:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(forwarder.pid, signal.SIGKILL)
            forwarder.wait(10)
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, timeout=30)


@contextlib.contextmanager
def network_host(label: str, index: int) -> Iterator[Host]:
    """A namespace ``label`` joined to this machine by a veth pair on 10.213.<index>.0/24
    (``index`` 1-250, distinct per concurrent use); removed with all it holds after."""
    for tool in ("ip", "socat", "unshare"):
        if shutil.which(tool) is None:
            raise NamespaceUnavailable(f"{tool} is not installed")
    host = Host(name=label, index=index)
    try:
        _ip("netns", "add", host.name)
        _ip("link", "add", host.host_link, "type", "veth", "peer", "name", host.ns_link)
        _ip("link", "set", host.ns_link, "netns", host.name)
        _ip("addr", "add", f"{host.host_ip}/24", "dev", host.host_link)
        _ip("link", "set", host.host_link, "up")
        _ip("addr", "add", f"{host.ns_ip}/24", "dev", host.ns_link, netns=host.name)
        _ip("link", "set", host.ns_link, "up", netns=host.name)
        _ip("link", "set", "lo", "up", netns=host.name)
        yield host
    finally:
        host._close()
