"""The task page's trace field: the task's trace id, linked to the operator's trace
viewer by ``AGENTS_TRACE_URL_TEMPLATE`` (``agents_project.tracing``)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.models import AgentTask
from tests.api.factories import started

pytestmark = pytest.mark.django_db(transaction=True)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_the_task_page_links_its_trace_to_the_configured_viewer(ops_client, user, settings):
    task = started(user)
    AgentTask.objects.filter(pk=task.pk).update(trace_context=f"00-{TRACE_ID}-00f067aa0ba902b7-01")
    url = reverse("admin:agents_agenttask_change", args=[task.pk])
    settings.AGENTS = {
        **settings.AGENTS,
        "TRACE_URL_TEMPLATE": "http://jaeger:16686/trace/{trace_id}",
    }
    html = ops_client.get(url).content.decode()
    assert f'<a href="http://jaeger:16686/trace/{TRACE_ID}"' in html
    settings.AGENTS = {**settings.AGENTS, "TRACE_URL_TEMPLATE": ""}
    html = ops_client.get(url).content.decode()
    assert TRACE_ID in html and "jaeger" not in html


def test_a_task_created_untraced_has_no_trace(ops_client, user, settings):
    task = started(user)
    settings.AGENTS = {
        **settings.AGENTS,
        "TRACE_URL_TEMPLATE": "http://jaeger:16686/trace/{trace_id}",
    }
    html = ops_client.get(reverse("admin:agents_agenttask_change", args=[task.pk])).content.decode()
    assert task.trace_id == "" and "jaeger:16686" not in html
