"""The console's circuit-breaker page (``/admin/breakers/``): every breaker's state, and
for operators allowed to, holding one open, closing it, or holding open by name a
breaker nothing has called yet (planned maintenance of a host).

The page calls the same functions as ``manage.py breakers`` (``tools.services`` and
``tools.breakers``); nothing here touches Redis itself.
"""

from __future__ import annotations

import re

import structlog
from django.contrib import admin, messages
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from redis import RedisError

from agents import permissions
from agents_project.errors import ApplicationError, InvalidInput
from audit.services import user_actor
from tools import breakers
from tools.breakers import BreakerStatus
from tools.selectors import breaker_states
from tools.services import breaker_force_close, breaker_force_open

logger = structlog.get_logger(__name__)

# A breaker name: what tools use (``weather-api``, ``http:host:port``), no spaces.
_NAME = re.compile(r"[A-Za-z0-9_.:@/\[\]-]{1,200}")


def breaker_may_change(user: User | AnonymousUser) -> bool:
    """Whether ``user`` may hold breakers open and close them from the console: the
    breaker permission (``tools.change_breaker``, ``agents.permissions``)."""
    return permissions.breakers_may_change(user)


def breaker_hold_open(*, name: str, actor: str) -> BreakerStatus:
    """Hold the breaker ``name`` open until closed, known to the runtime or not (a host
    nothing has called yet can be closed off before planned maintenance).

    Raises ``InvalidInput`` (field ``name``) for a name no tool could use.
    """
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            "must be a breaker name such as weather-api or http:host:port (no spaces)",
            field="name",
        )
    if name in breakers.breaker_names():
        return breaker_force_open(name=name, actor=actor)
    breakers.force_open(name, actor=actor)
    logger.warning("circuit breaker held open before first use", breaker=name, actor=actor)
    return breakers.breaker_status(name)


def breakers_view(request: HttpRequest) -> HttpResponse:
    """GET: the breakers page (``tools.view_breaker``). POST ``action`` (``open``,
    ``close``) and ``name``: hold open or close one breaker (``breaker_may_change``),
    then back to the page."""
    if not permissions.breakers_may_view(request.user):
        raise PermissionDenied
    may_change = breaker_may_change(request.user)
    if request.method == "POST":
        if not may_change:
            raise PermissionDenied
        _act(request)
        return HttpResponseRedirect(reverse("admin-breakers"))
    try:
        rows, problem = breaker_states(), ""
    except RedisError as exc:
        rows, problem = [], f"Circuit breaker state is unavailable: {exc}"
    context = {
        **admin.site.each_context(request),
        "title": "Circuit breakers",
        "breakers": rows,
        "problem": problem,
        "may_change": may_change,
    }
    return TemplateResponse(request, "admin/breakers.html", context)


def _act(request: HttpRequest) -> None:
    action = request.POST.get("action", "")
    name = request.POST.get("name", "")
    actor = user_actor(request.user)
    try:
        if action == "open":
            status = breaker_hold_open(name=name, actor=actor)
            messages.success(request, f"Circuit breaker {status.name} is held open.")
        elif action == "close":
            status = breaker_force_close(name=name, actor=actor)
            messages.success(request, f"Circuit breaker {status.name} is closed.")
        else:
            raise InvalidInput(f"unknown action {action!r}", field="action")
    except ApplicationError as exc:
        messages.error(request, f"{action} {name}: {exc.message}")
    except RedisError as exc:
        messages.error(request, f"{action} {name}: circuit breaker state is unavailable: {exc}")
