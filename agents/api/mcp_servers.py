"""``/api/mcp-servers/``: an owner's own MCP tool servers (``tools.mcp``).

A user lists the servers their tasks may use (the deployment's, read-only here, and
their own), registers their own, and removes their own. Only streamable-HTTP servers
are registered here: a stdio server runs a command on the workers, which only an
operator decides (``manage.py mcp_servers add --command``). The URL passes the outbound
policy like every request a tool makes; header values name the user's own credentials.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response

from agents.api.schema import errors
from agents_project.errors import InvalidInput
from audit.services import user_actor
from tools.mcp import (
    mcp_server_add,
    mcp_server_as_dict,
    mcp_server_remove,
    mcp_servers_visible,
)


class McpServerSerializer(serializers.Serializer):
    """A server as listed (``tools.mcp.mcp_server_as_dict``)."""

    name = serializers.CharField()
    owner = serializers.CharField(allow_null=True, help_text="null: the deployment's.")
    transport = serializers.ChoiceField(choices=["stdio", "http"])
    command = serializers.CharField(allow_null=True)
    url = serializers.CharField(allow_null=True)
    headers = serializers.DictField(
        child=serializers.CharField(), help_text="Header name -> the caller's credential name."
    )
    approve = serializers.ChoiceField(choices=["destructive", "all", "none"])
    timeout = serializers.FloatField()
    tools = serializers.ListField(child=serializers.CharField(), help_text="mcp:NAME/TOOL")
    discovered_at = serializers.DateTimeField(allow_null=True)


class McpServerCreateSerializer(serializers.Serializer):
    name = serializers.CharField()
    url = serializers.CharField()
    headers = serializers.DictField(child=serializers.CharField(), required=False, default=dict)
    approve = serializers.CharField(required=False, default="destructive")
    timeout = serializers.FloatField(required=False, allow_null=True, default=None)


class McpServerViewSet(viewsets.ViewSet):
    """The MCP servers your tasks may use; register and remove your own."""

    lookup_field = "name"
    lookup_value_regex = "[^/]+"

    @extend_schema(
        summary="MCP servers your tasks may use (the deployment's and your own)",
        responses=McpServerSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        servers = [mcp_server_as_dict(s) for s in mcp_servers_visible(owner=request.user)]
        return Response(McpServerSerializer(servers, many=True).data)

    @extend_schema(
        summary="Register a streamable-HTTP MCP server of your own and discover its tools",
        request=McpServerCreateSerializer,
        responses={201: McpServerSerializer, **errors(400, 409)},
    )
    def create(self, request: Request) -> Response:
        if isinstance(request.data, dict) and "command" in request.data:
            raise InvalidInput(
                "stdio servers run a command on the workers: an operator registers them "
                "(manage.py mcp_servers add --command)",
                field="command",
            )
        serializer = McpServerCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data: dict[str, Any] = dict(serializer.validated_data)
        server = mcp_server_add(owner=request.user, actor=user_actor(request.user), **data)
        return Response(
            McpServerSerializer(mcp_server_as_dict(server)).data, status=status.HTTP_201_CREATED
        )

    @extend_schema(summary="Remove an MCP server of your own", responses={204: None, **errors(404)})
    def destroy(self, request: Request, name: str) -> Response:
        mcp_server_remove(name=name, owner=request.user, actor=user_actor(request.user))
        return Response(status=status.HTTP_204_NO_CONTENT)
