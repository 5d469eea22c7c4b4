"""The admin's task page links a parent to its children and a child to its parent."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agents.models import AgentTask
from agents.services import task_start
from tests.helpers import run_until_idle

pytestmark = pytest.mark.django_db(transaction=True)


def page(pk: object) -> str:
    return reverse("admin:agents_agenttask_change", args=[pk])


def test_the_task_page_links_parent_and_children_both_ways(ops_client, user):
    child = {"agent": "scripted", "input": {"script": [{"final": 1}]}}
    parent, _ = task_start(
        owner=user, agent="scripted", input={"script": [{"spawn": [child, child]}]}
    )
    run_until_idle()
    children = list(AgentTask.objects.filter(parent=parent).order_by("spawn_index"))
    html = ops_client.get(page(parent.pk)).content.decode()
    for each in children:
        assert f'href="{page(each.pk)}"' in html
    html = ops_client.get(page(children[1].pk)).content.decode()
    assert f'<a href="{page(parent.pk)}">{parent.pk}</a> (step 1, child 1)' in html
