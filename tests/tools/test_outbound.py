"""Issue 12, findings 3 and 4: the outbound-request policy (SSRF) and credentials bound
to hosts.

Forms of loopback go through the real ``http.get`` tool against a real server on
127.0.0.1, which proves they never reach it. Other non-public ranges are checked with
``outbound_check`` alone (it resolves, it never connects): this machine sends no
traffic to private or link-local networks, even when a test fails.
"""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from agents.definition import ToolCall
from agents.errors import PermanentError, ToolArgumentError
from tools.credentials import credential_set
from tools.outbound import OutboundPolicy, OutboundRefused, is_public, outbound_check
from tools.runner import ToolRun, tools_run

pytestmark = pytest.mark.django_db

LOOPBACK_FORMS = [
    "127.0.0.1",
    "2130706433",  # 127.0.0.1 as one decimal number
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "127.0.1",
    "0.0.0.0",
    "0",
    "localhost",
    "LOCALHOST.",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[::7f00:1]",
    "[::ffff:0:7f00:1]",  # IPv4-translated
    "[::ffff:0:127.0.0.1]",
    "[64:ff9b::7f00:1]",  # NAT64
    "[2002:7f00:1::1]",  # 6to4
]

NON_PUBLIC = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # shared address space
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "[fe80::1]",
    "[fd00::1]",
    "[fc00::1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:169.254.169.254]",
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
    "[ff02::1]",
    "[fec0::1]",  # site-local (deprecated), which ipaddress calls global
    "[::10.0.0.1]",  # IPv4-compatible
    "[::ffff:0:a9fe:a9fe]",  # IPv4-translated 169.254.169.254
    "[64:ff9b:1::a9fe:a9fe]",  # local-use NAT64
    "[2001:0:4136:e378:8000:63bf:f5ff:fffe]",  # Teredo whose client is 10.0.0.1
    "[2001:db8::1]",  # documentation
    "[100::1]",  # discard-only
]


def _get(user, url: str, **args):
    run = ToolRun(task_id=uuid.uuid4(), owner_id=user.pk, step=1, events=[])
    return tools_run(run, [ToolCall("http.get", {"url": url, **args})])


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_http_get_refuses_every_form_of_loopback(user, flaky, host):
    with pytest.raises(PermanentError, match="non-public address"):
        _get(user, f"http://{host}:{flaky.port}/metrics")
    assert flaky.requests == [], "the request reached the loopback server"


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_private_link_local_metadata_and_reserved_addresses_are_refused(host):
    with pytest.raises(OutboundRefused, match="non-public address"):
        outbound_check(f"http://{host}/latest/meta-data/", policy=OutboundPolicy())


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_addresses_are_allowed(address):
    assert is_public(ipaddress.ip_address(address))
    target = outbound_check(
        f"https://[{address}]/" if ":" in address else f"https://{address}/",
        policy=OutboundPolicy(),
    )
    assert target.pinned_url.startswith("https://")


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/",
        "gopher://127.0.0.1:6379/_INFO",
        "http://user:pw@example.com/",
        "http:///nohost",
        "http://example.com:99999/",
    ],
)
def test_other_schemes_user_info_and_bad_urls_are_refused(url):
    with pytest.raises(OutboundRefused):
        outbound_check(url, policy=OutboundPolicy())


def test_the_allow_list_lets_a_deployment_reach_its_own_hosts(user, flaky, loopback_allowed):
    result = _get(user, flaky.url("/data"))
    assert result[0].value["status"] == 200
    assert len(flaky.requests) == 1


@pytest.mark.parametrize(
    "entry", ["127.0.0.0/8", "127.0.0.1", "localhost", "*.localhost", "::ffff:127.0.0.1/128"]
)
def test_allow_list_entries_are_hosts_addresses_or_cidrs(entry):
    from tools.outbound import parse_allow_list

    hosts, networks = parse_allow_list([entry])
    assert hosts or networks


def test_a_bad_allow_list_entry_is_a_start_up_error(settings):
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["http://x/y"]}
    with pytest.raises(SystemCheckError, match="AGENTS_OUTBOUND_ALLOW"):
        call_command("check")


def test_every_redirect_hop_is_checked(user, flaky, settings):
    # "localhost" is allowed by name; the address 127.0.0.1 is not: the redirect to it
    # must be refused although the first hop was fine.
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["localhost"]}
    target = f"http://127.0.0.1:{flaky.port}/internal"
    with pytest.raises(PermanentError, match="non-public address"):
        _get(user, f"http://localhost:{flaky.port}/redirect?to={target}")
    assert [r.path.split("?")[0] for r in flaky.requests] == ["/redirect"]


def test_redirects_are_followed_within_the_limit_and_connect_to_the_checked_address(
    user, flaky, loopback_allowed
):
    final = flaky.url("/data")
    result = _get(user, flaky.url(f"/redirect?to={final}"))
    assert result[0].value["status"] == 200
    assert [r.path.split("?")[0] for r in flaky.requests] == ["/redirect", "/data"]
    # The connection went to the resolved address; the Host header kept the name.
    assert flaky.requests[-1].host == f"127.0.0.1:{flaky.port}"


def test_too_many_redirects_are_refused(user, flaky, loopback_allowed, settings):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_MAX_REDIRECTS": 2}
    url = flaky.url("/data")
    for _ in range(3):
        url = flaky.url(f"/redirect?to={url}")
    with pytest.raises(PermanentError, match="more than 2 redirects"):
        _get(user, url)


def test_a_response_over_the_size_limit_is_refused(user, flaky, loopback_allowed, settings):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_MAX_BYTES": 10_000}
    assert _get(user, flaky.url("/big?bytes=10000"))[0].value["status"] == 200
    with pytest.raises(PermanentError, match="larger than 10000 bytes"):
        _get(user, flaky.url("/big?bytes=10001"))


@pytest.mark.parametrize("timeout", [0, -1, float("inf")])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(user, timeout):
    with pytest.raises(ToolArgumentError, match="args.timeout"):
        _get(user, "http://127.0.0.1:9/", timeout=timeout)


# --- credentials bound to hosts (finding 3) ---------------------------------------------


def _get_with(user, url: str, name: str = "api_key"):
    from agents.services import task_start

    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
    run = ToolRun(task_id=task.pk, owner_id=user.pk, step=1, events=[])
    return tools_run(run, [ToolCall("http.get", {"url": url, "bearer": name})])


@pytest.mark.parametrize(
    ("bound", "sent"),
    [
        (["api.example.com"], False),
        (["*.example.com"], False),
        (["localhost"], False),  # the request goes to 127.0.0.1, not to localhost
        (["127.0.0.1"], None),  # an address is not a host name: refused at set
        ([], None),  # no hosts: refused at set (--any-host is the explicit exception)
        (["*"], None),  # nor is "any host" a host name
    ],
)
def test_a_credential_bound_to_hosts_is_sent_nowhere_else(
    user, flaky, loopback_allowed, bound, sent
):
    secret = "sk-bound-0123456789"
    if sent is None:
        from agents_project.errors import InvalidInput

        with pytest.raises(InvalidInput) as refused:
            credential_set(owner=user, name="api_key", value=secret, hosts=bound, actor="t")
        assert refused.value.field == "hosts"
        return
    credential_set(owner=user, name="api_key", value=secret, hosts=bound, actor="test")
    if sent:
        _get_with(user, flaky.url("/me"))
        assert flaky.requests[0].authorization == f"Bearer {secret}"
        return
    with pytest.raises(ToolArgumentError, match="may only be sent to") as refused:
        _get_with(user, flaky.url("/me"))
    assert "127.0.0.1" in str(refused.value) and secret not in str(refused.value)
    assert flaky.requests == []


def test_a_credential_with_any_host_is_sent_to_any_allowed_host(user, flaky, loopback_allowed):
    secret = "sk-anyhost-0123456789"
    credential_set(owner=user, name="api_key", value=secret, any_host=True, actor="test")
    _get_with(user, flaky.url("/me"))
    assert flaky.requests[0].authorization == f"Bearer {secret}"


def test_an_unbound_credential_is_sent_nowhere_and_check_deploy_reports_it(
    user, flaky, loopback_allowed
):
    """A credential stored before hosts were required (hosts ``[]``) goes to no host."""
    from django.core import checks

    from tools.models import Credential

    secret = "SECRETVALUE-0123456789"
    credential_set(owner=user, name="api_key", value=secret, any_host=True, actor="test")
    Credential.objects.filter(name="api_key").update(hosts=[])
    with pytest.raises(ToolArgumentError, match="bound to no host") as refused:
        _get_with(user, flaky.url("/me"))
    assert secret not in str(refused.value)
    assert flaky.requests == []
    found = [
        message
        for message in checks.run_checks(include_deployment_checks=True)
        if message.id == "tools.W002"
    ]
    assert len(found) == 1 and f"{user.username}/api_key" in found[0].msg
    Credential.objects.filter(name="api_key").update(hosts=["api.example.com"])
    assert not [
        m for m in checks.run_checks(include_deployment_checks=True) if m.id == "tools.W002"
    ]


def test_the_command_requires_hosts_or_any_host(user):
    import io

    from django.core.management import CommandError, call_command

    from tools.models import Credential

    def set_(*extra):
        call_command(
            "credentials",
            "set",
            "--owner",
            user.username,
            "--name",
            "k",
            *extra,
            stdin=io.StringIO("sk-0123456789\n"),
        )

    with pytest.raises(CommandError, match="hosts: .*--host.*--any-host"):
        set_()
    assert not Credential.objects.exists()
    with pytest.raises(CommandError, match="hosts: .*not both"):
        set_("--any-host", "--host", "api.example.com")
    set_("--any-host")
    assert Credential.objects.get().hosts == ["*"]


def test_a_credential_bound_to_its_host_is_sent_there(user, flaky, settings):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["localhost"]}
    secret = "sk-bound-0123456789"
    credential_set(owner=user, name="api_key", value=secret, hosts=["localhost"], actor="t")
    _get_with(user, f"http://localhost:{flaky.port}/me")
    assert flaky.requests[0].authorization == f"Bearer {secret}"


def test_authorization_is_dropped_on_a_redirect_to_another_host(user, flaky, loopback_allowed):
    settings_hosts = ["localhost"]
    credential_set(owner=user, name="api_key", value="sk-0123456789", any_host=True, actor="test")
    from django.conf import settings

    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1", *settings_hosts]}
    other = f"http://localhost:{flaky.port}/data"
    _get_with(user, flaky.url(f"/redirect?to={other}"))
    first, second = flaky.requests
    assert first.authorization == "Bearer sk-0123456789"
    assert second.authorization == ""
