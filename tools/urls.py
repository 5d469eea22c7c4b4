"""Liveness and readiness of the web process (included by ``agents_project.urls``)."""

from django.urls import path

from tools.health import healthz, readyz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
