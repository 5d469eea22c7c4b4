"""DRF permission classes over ``agents.permissions`` (the one rule for every surface)."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from agents import permissions


class MayViewBreakers(BasePermission):
    """``tools.view_breaker`` (or ``change_breaker``): breakers describe the whole system."""

    message = f"reading circuit breakers needs the {permissions.BREAKER_VIEW} permission"

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and permissions.breakers_may_view(user))
