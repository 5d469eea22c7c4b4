"""``/api/mcp-servers/``: an owner's own MCP servers (issue 25, item 1)."""

from __future__ import annotations

import pytest

from tests.tools.conftest import _forget_breakers
from tests.tools.mcp_servers import TIME_SERVER, http_server
from tools.mcp import mcp_cache_clear, mcp_server_add
from tools.models import McpServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_breakers():
    """No breaker state from another test in, none of this one's out (the healthcheck
    of later tests reads every breaker)."""
    _forget_breakers()
    yield
    _forget_breakers()


@pytest.fixture(autouse=True)
def _fresh_mcp_cache():
    mcp_cache_clear()
    yield
    mcp_cache_clear()


def test_an_owner_registers_lists_and_removes_their_own_http_server(
    api, other_api, user, settings, tmp_path
):
    settings.AGENTS = {**settings.AGENTS, "OUTBOUND_ALLOW": ["127.0.0.1"]}
    mcp_server_add(name="time", command=TIME_SERVER, actor="test")  # the deployment's
    with http_server(tmp_path) as server:
        created = api.post(
            "/api/mcp-servers/", {"name": "tracker", "url": server.url}, format="json"
        )
        assert created.status_code == 201, created.json()
        assert "mcp:tracker/echo" in created.json()["tools"]
        assert created.json()["owner"] == "alice"

    mine = {s["name"]: s["owner"] for s in api.get("/api/mcp-servers/").json()}
    assert mine == {"time": None, "tracker": "alice"}
    theirs = {s["name"] for s in other_api.get("/api/mcp-servers/").json()}
    assert theirs == {"time"}  # another tenant never sees alice's server

    assert other_api.delete("/api/mcp-servers/tracker/").status_code == 404
    assert api.delete("/api/mcp-servers/time/").status_code == 404  # the deployment's
    assert api.delete("/api/mcp-servers/tracker/").status_code == 204
    assert list(McpServer.objects.values_list("name", flat=True)) == ["time"]


def test_stdio_servers_and_refused_urls_are_not_registered_from_the_api(api):
    command = api.post("/api/mcp-servers/", {"name": "x", "command": "rm -rf /"}, format="json")
    assert command.status_code == 400
    assert command.json()["field"] == "command"
    loopback = api.post(
        "/api/mcp-servers/", {"name": "x", "url": "http://127.0.0.1:6379/mcp"}, format="json"
    )
    assert loopback.status_code == 400
    assert loopback.json()["field"] == "url"
    assert McpServer.objects.count() == 0
