"""Operator pages beside the Django admin (included by ``agents_project.urls`` under
``admin/``, before the admin site's own routes)."""

from django.contrib import admin
from django.urls import path

from agents.console import breakers_view

urlpatterns = [
    path("breakers/", admin.site.admin_view(breakers_view), name="admin-breakers"),
]
