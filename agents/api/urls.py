"""``/api/...`` routes (included from ``agents_project.urls``; ``llm.api_urls`` adds the
conversation's)."""

from __future__ import annotations

from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from agents.api.mcp_servers import McpServerViewSet
from agents.api.views import (
    BreakerListView,
    DeadLetterViewSet,
    ScheduleViewSet,
    TaskViewSet,
    TokenRotateView,
    not_found,
)

router = SimpleRouter()
router.register("tasks", TaskViewSet, basename="task")
router.register("dead-letters", DeadLetterViewSet, basename="dead-letter")
router.register("schedules", ScheduleViewSet, basename="schedule")
router.register("mcp-servers", McpServerViewSet, basename="mcp-server")

urlpatterns = [
    *router.urls,
    path("breakers/", BreakerListView.as_view(), name="api-breakers"),
    path("token/rotate/", TokenRotateView.as_view(), name="api-token-rotate"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^(?P<path>.*)$", not_found, name="api-not-found"),
]
