"""The outbound-request policy: every HTTP call a tool makes goes through ``outbound_get``.

A task (or a model choosing a tool's arguments) decides which URL is fetched, so a
fetch must not reach what only the deployment itself should reach (server-side request
forgery): the app's own ``/metrics``, a cloud metadata service, Redis, PostgreSQL, the
private network. The rule, applied to every address a host name resolves to, and again
on every redirect hop:

- only ``http`` and ``https``;
- the address must be globally routable (``ipaddress``'s ``is_global``): loopback
  (``127.0.0.0/8``, ``::1``, so also ``localhost``, ``2130706433``, ``127.1``),
  private (RFC 1918, ``fc00::/7``), link-local (``169.254.0.0/16``, the metadata
  address ``169.254.169.254``, ``fe80::/10``), unspecified (``0.0.0.0``, ``::``),
  shared, reserved and multicast addresses are refused, and so are ranges
  ``ipaddress`` calls global but are not (site-local ``fec0::/10``, local NAT64
  ``64:ff9b:1::/48``, discard, documentation). IPv6 forms that carry an IPv4 address
  (mapped ``::ffff:a.b.c.d``, translated ``::ffff:0:a.b.c.d``, compatible
  ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) are judged by
  every IPv4 address they carry;
- unless the host name or the address is in ``AGENTS_OUTBOUND_ALLOW`` (comma-separated
  host names, ``*.example.com`` for subdomains, addresses or CIDRs), the hosts a
  deployment means to reach;
- the connection goes to the address that was checked (the URL is rewritten to it,
  with the ``Host`` header and TLS SNI/certificate check kept on the name), so a DNS
  answer that changes between the check and the connection (rebinding) cannot move it;
- at most ``AGENTS_OUTBOUND_MAX_REDIRECTS`` redirects, each checked like the first;
  the ``Authorization`` header is dropped when a redirect changes host;
- a response body of at most ``AGENTS_OUTBOUND_MAX_BYTES``, and the whole exchange
  (redirects included) within the caller's timeout.

A refusal is ``OutboundRefused`` (a ``PermanentError``: the same URL is refused every
time, and it never counts against a circuit breaker).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from django.conf import settings

from agents_project.errors import PermanentError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


class OutboundRefused(PermanentError):
    """The policy refuses this request (address, scheme, size or redirects)."""


@dataclass(frozen=True)
class OutboundPolicy:
    """What a deployment lets tools reach (from ``settings.AGENTS``)."""

    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 1024 * 1024
    max_redirects: int = 5

    @classmethod
    def from_settings(cls) -> OutboundPolicy:
        hosts, networks = parse_allow_list(settings.AGENTS["OUTBOUND_ALLOW"])
        return cls(
            allow_hosts=hosts,
            allow_networks=networks,
            max_bytes=settings.AGENTS["OUTBOUND_MAX_BYTES"],
            max_redirects=settings.AGENTS["OUTBOUND_MAX_REDIRECTS"],
        )

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allow_hosts)

    def address_allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allow_networks) or is_public(address)


def parse_allow_list(entries: Iterable[str]) -> tuple[tuple[str, ...], tuple[IPNetwork, ...]]:
    """``["api.example.com", "*.corp.example", "10.1.0.0/16", "127.0.0.1"]`` -> (host
    patterns, networks). Raises ``ValueError`` on an entry that is neither."""
    hosts: list[str] = []
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        label = entry[2:] if entry.startswith("*.") else entry
        if not label or any(c in label for c in "/:@ *?[]"):
            raise ValueError(f"AGENTS_OUTBOUND_ALLOW: {raw!r} is not a host, address or CIDR")
        hosts.append(entry)
    return tuple(hosts), tuple(networks)


# IPv6 ranges that are not globally routable although ``ipaddress`` (3.11) calls them
# global, or whose embedded IPv4 address is what the connection reaches.
_NOT_GLOBAL_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "fec0::/10",  # site-local (deprecated, RFC 3879), still routed inside some sites
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "100::/64",  # discard-only (RFC 6666)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs (RFC 9602)
        "2001::/23",  # IETF protocol assignments (Teredo is judged by what it carries)
    )
)
_TEREDO = ipaddress.IPv6Network("2001::/32")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4-mapped, ::ffff:a.b.c.d
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765)
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # IPv4-compatible (deprecated), :: and ::1 too


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, in any of its forms: mapped,
    translated, compatible, NAT64 (well-known prefix), 6to4, Teredo (server and client).
    Empty for a plain IPv6 address."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _MAPPED or address in _TRANSLATED or address in _COMPATIBLE:
        return [low32]
    if address in _NAT64:
        return [low32]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    return []


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address (see the module's docstring): an
    IPv6 address that carries an IPv4 one is judged by every IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        embedded = _embedded_ipv4(address)
        if embedded:
            return all(is_public(v4) for v4 in embedded)
        if address in _TEREDO:
            return False
        if any(address in network for network in _NOT_GLOBAL_V6):
            return False
    return bool(address.is_global and not address.is_multicast)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal address: itself), as the system
    resolver gives them; ``OutboundRefused`` if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundRefused(f"{host!r} does not resolve: {exc}") from None
    addresses: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``) and what to call it (``host``)."""

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        netloc = f"{literal}:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def outbound_check(url: str, *, policy: OutboundPolicy | None = None) -> Target:
    """Check ``url`` against the policy and return where to connect.

    Raises ``OutboundRefused`` naming the reason (not the URL's credentials: user info
    in a URL is refused outright).
    """
    policy = policy or OutboundPolicy.from_settings()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OutboundRefused(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundRefused("only http(s) URLs with a host are fetched")
    if parts.username is not None or parts.password is not None:
        raise OutboundRefused("URLs with user information are refused; use a credential")
    host = parts.hostname.lower().rstrip(".")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise OutboundRefused(f"{host!r} does not resolve")
    if not policy.host_allowed(host):
        refused = [a for a in addresses if not policy.address_allowed(a)]
        if refused:
            raise OutboundRefused(
                f"{host} resolves to {refused[0]}, a non-public address; requests to "
                "loopback, private, link-local and metadata addresses are refused "
                "(AGENTS_OUTBOUND_ALLOW lists the ones a deployment means to reach)"
            )
    return Target(url=url, scheme=parts.scheme, host=host, port=port, address=addresses[0])


@dataclass(frozen=True)
class OutboundResponse:
    status_code: int
    headers: httpx.Headers
    content: bytes
    url: str

    @property
    def text(self) -> str:
        """The body decoded as its ``Content-Type`` charset says (UTF-8 otherwise)."""
        return httpx.Response(200, headers=self.headers, content=self.content).text


def outbound_get(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    policy: OutboundPolicy | None = None,
) -> OutboundResponse:
    """GET ``url`` under the outbound policy; follows redirects, each hop checked.

    ``timeout`` (seconds) bounds the whole exchange. Raises ``OutboundRefused`` for a
    refused address, scheme, redirect or a body over the size limit, and
    ``httpx.HTTPError`` for transport failures (the caller decides if they are
    retryable).
    """
    policy = policy or OutboundPolicy.from_settings()
    deadline = time.monotonic() + timeout
    sent = dict(headers or {})
    target = outbound_check(url, policy=policy)
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            response = _fetch(client, target, sent, deadline, policy)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or not location:
                return response
            next_url = urljoin(target.url, location)
            following = outbound_check(next_url, policy=policy)
            if following.host != target.host:
                sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
            target = following
    raise OutboundRefused(f"more than {policy.max_redirects} redirects")


def _fetch(
    client: httpx.Client,
    target: Target,
    headers: Mapping[str, str],
    deadline: float,
    policy: OutboundPolicy,
) -> OutboundResponse:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise httpx.ReadTimeout("the request's time limit passed")
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    request = client.build_request(
        "GET",
        target.pinned_url,
        # identity: the size limit then bounds what is read, not a compressed stream.
        headers={"Accept-Encoding": "identity", **headers, "Host": target.host_header},
        timeout=httpx.Timeout(remaining),
        extensions=extensions,
    )
    response = client.send(request, stream=True)
    try:
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
                raise OutboundRefused(
                    f"the response from {target.host} is larger than {policy.max_bytes} "
                    "bytes (AGENTS_OUTBOUND_MAX_BYTES)"
                )
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the request's time limit passed while reading")
    finally:
        response.close()
    return OutboundResponse(
        status_code=response.status_code,
        headers=response.headers,
        content=bytes(body),
        url=target.url,
    )
