from django.contrib import admin
from django.urls import include, path

from agents.console import breakers_view
from agents_project.health import healthz, readyz
from agents_project.metrics import metrics_view

urlpatterns = [
    path("admin/breakers/", admin.site.admin_view(breakers_view), name="admin-breakers"),
    path("admin/", admin.site.urls),
    path("api/", include("agents.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
