"""The project's routes: each app's own, included by name (this package imports no app)."""

from django.contrib import admin
from django.urls import include, path

from agents_project.metrics import metrics_view

urlpatterns = [
    path("admin/", include("agents.admin_urls")),
    path("admin/", admin.site.urls),
    # Before agents.api.urls, which ends with the API's catch-all 404.
    path("api/", include("llm.api_urls")),
    path("api/", include("agents.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("", include("tools.urls")),
]
