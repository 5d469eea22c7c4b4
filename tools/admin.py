"""Credentials in the admin: who has which, never the value (not even encrypted).

Values are set with ``manage.py credentials set`` (or ``tools.credentials``), which
reads them from stdin; the admin can only list and delete them.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from tools.models import Credential


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
