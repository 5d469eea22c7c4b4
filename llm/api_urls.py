"""``/api/tasks/{id}/messages/`` (included from ``agents_project.urls`` under ``api/``)."""

from django.urls import path

from llm.api import TaskMessagesView

urlpatterns = [
    path("tasks/<str:pk>/messages/", TaskMessagesView.as_view(), name="task-messages"),
]
