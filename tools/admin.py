"""Credentials in the admin: who has which, never the value (not even encrypted).

Values are set with ``manage.py credentials set`` (or ``tools.credentials``), which
reads them from stdin; the admin can only list and delete them.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from tools.models import Credential, McpServer


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "task", "updated_at")
    list_filter = ("owner",)
    search_fields = ("name", "owner__username")
    fields = ("name", "owner", "task", "created_at", "updated_at")
    readonly_fields = fields
    list_select_related = ("owner",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(McpServer)
class McpServerAdmin(admin.ModelAdmin):
    """MCP servers: listed and removed here; added with ``manage.py mcp_servers add``
    (or ``/api/mcp-servers/``), which checks the server and lists its tools first."""

    list_display = ("name", "owner", "transport", "approve", "tool_count", "discovered_at")
    list_filter = ("owner",)
    search_fields = ("name", "owner__username", "url")
    fields = (
        "name",
        "owner",
        "command",
        "url",
        "headers",
        "approve",
        "timeout",
        "tools",
        "discovered_at",
        "created_at",
    )
    readonly_fields = fields
    list_select_related = ("owner",)

    @admin.display(description="transport")
    def transport(self, obj: McpServer) -> str:
        return "stdio" if obj.command else "http"

    @admin.display(description="tools")
    def tool_count(self, obj: McpServer) -> int:
        return len(obj.tools or ())

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
