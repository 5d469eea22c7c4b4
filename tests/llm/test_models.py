"""Models on an allow-list: only the names in AGENTS_LLM_MODELS (and the default model)
run, matched exactly; a cost budget needs a price; a model that names a credential uses
the tenant's, never the deployment's key. Refused at task creation through the API
(400 naming the field, nothing written), else at the step (the settings changed since).
Through the real API, queue and ``openai`` SDK against the scripted server on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.cache import cache

from agents.models import AgentTask
from agents.services import task_start
from llm.models import ModelCall
from tests.api.conftest import token_client
from tests.helpers import run_until_idle
from tools.credentials import credential_set

pytestmark = pytest.mark.django_db(transaction=True)

DEPLOYMENT_KEY = "sk-DEPLOYMENT-KEY-0000"
TENANT_KEY = "sk-TENANT-KEY-1111"


@pytest.fixture(autouse=True)
def _fresh_throttle_counters() -> None:
    cache.clear()


@pytest.fixture
def models(chat, settings):
    settings.LLM = {
        **settings.LLM,
        "API_KEY": DEPLOYMENT_KEY,
        "MODELS": {
            "acc-model": {},
            "priced": {"price": {"input": 1.0, "output": 2.0}},
            "free-priced": {"price": {"input": 0, "output": 0}},
            "tenant-model": {"api_key_credential": "openai"},
        },
    }
    return chat


def create(user, **input):
    body = {"agent": "llm", "input": {"prompt": "hi", **input}}
    return token_client(user).post("/api/tasks/", body, format="json")


@pytest.mark.parametrize(
    ("input", "says"),
    [
        ({"model": "gpt-4o"}, "not allowed"),
        ({"model": "o1-pro-most-expensive"}, "not allowed"),
        ({"model": "acc-model "}, "not allowed"),  # a trailing-space twin
        ({"model": " acc-model"}, "not allowed"),
        ({"model": "ACC-MODEL"}, "not allowed"),
        ({"model": ""}, "model name"),
        ({"model": "acc-model", "budget": {"cost": 0.000001}}, "no price"),
        ({"budget": {"cost": 0.000001}}, "no price"),  # the default model, unpriced
    ],
)
def test_a_model_not_allowed_is_refused_at_creation_naming_the_field(models, user, input, says):
    answer = create(user, **input)
    assert answer.status_code == 400, answer.content
    body = answer.json()
    assert body["field"] == "input.model"
    assert says in body["detail"]
    assert not AgentTask.objects.exists()
    assert models.requests == []


@pytest.mark.parametrize(
    "input",
    [
        {},  # the default model (AGENTS_LLM_MODEL)
        {"model": "scripted"},
        {"model": "acc-model"},
        {"model": "priced", "budget": {"cost": 0.5}},
        {"model": "free-priced", "budget": {"cost": 0.5}},  # 0 is a price when given
    ],
)
def test_models_on_the_list_run(models, user, input):
    answer = create(user, **input)
    assert answer.status_code == 201, answer.content
    run_until_idle()
    task = AgentTask.objects.get(pk=answer.json()["id"])
    assert task.status == "completed", task.error
    sent = models.received(task=task.pk)
    assert [r.body["model"] for r in sent] == [input.get("model", "scripted")]
    assert sent[0].authorization == f"Bearer {DEPLOYMENT_KEY}"


def test_a_cost_budget_trips_on_a_priced_model(models, user):
    answer = create(user, model="priced", budget={"cost": 0.000001})
    assert answer.status_code == 201, answer.content
    run_until_idle()
    task = AgentTask.objects.get(pk=answer.json()["id"])
    assert task.status == "failed"
    assert task.error.startswith("budget_exceeded")
    assert models.requests == []


def test_a_model_taken_off_the_list_is_refused_at_the_step(models, user, settings):
    task, _ = task_start(owner=user, agent="llm", input={"prompt": "hi", "model": "acc-model"})
    settings.LLM = {**settings.LLM, "MODELS": {"scripted": {}}}
    run_until_idle()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "failed"
    assert task.error.startswith("input.model: model 'acc-model' is not allowed"), task.error
    assert models.requests == []
    assert not ModelCall.objects.exists()


def test_a_price_removed_under_a_cost_budget_is_refused_at_the_step(models, user, settings):
    task, _ = task_start(
        owner=user, agent="llm", input={"prompt": "hi", "model": "priced", "budget": {"cost": 1}}
    )
    settings.LLM = {**settings.LLM, "MODELS": {"priced": {}}}
    run_until_idle()
    task = AgentTask.objects.get(pk=task.pk)
    assert task.status == "failed"
    assert task.error.startswith("input.model: model 'priced' has no price"), task.error
    assert models.requests == []


def test_a_model_naming_a_credential_uses_the_tenant_s_key(models, user, settings):
    # The model's server by the name the credential is bound to (localhost: 127.0.0.1).
    local = models.url.replace("127.0.0.1", "localhost")
    tenant = {"api_key_credential": "openai", "base_url": local}
    settings.LLM = {**settings.LLM, "MODELS": {**settings.LLM["MODELS"], "tenant-model": tenant}}
    credential_set(owner=user, name="openai", value=TENANT_KEY, hosts=["localhost"], actor="test")
    answer = create(user, model="tenant-model")
    assert answer.status_code == 201, answer.content
    run_until_idle()
    task = AgentTask.objects.get(pk=answer.json()["id"])
    assert task.status == "completed", task.error
    sent = models.received(task=task.pk)
    assert [r.authorization for r in sent] == [f"Bearer {TENANT_KEY}"]


def test_a_model_naming_a_credential_never_falls_back_to_the_deployment_s_key(models, user):
    answer = create(user, model="tenant-model")
    assert answer.status_code == 201, answer.content
    run_until_idle()
    task = AgentTask.objects.get(pk=answer.json()["id"])
    assert task.status == "failed"
    assert "credential 'openai'" in task.error
    assert models.requests == []


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"acc-model ": {}}', "spaces around it"),
        ('{"": {}}', "is empty"),
        ('{"m": {"price": {"input": 1}}}', "its price"),
        ('{"m": {"price": {"input": -1, "output": 1}}}', "its price"),
        ('{"m": "gpt-4o"}', "must be an object"),
    ],
)
def test_settings_refuse_model_names_with_spaces_and_bad_prices(value, says):
    env = {**os.environ, "AGENTS_LLM_MODELS": value}
    done = subprocess.run(
        [sys.executable, "-c", "import agents_project.settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and says in done.stderr, done.stderr


def test_a_model_credential_bound_to_other_hosts_is_not_sent(models, user):
    credential_set(
        owner=user, name="openai", value=TENANT_KEY, hosts=["api.example.com"], actor="test"
    )
    answer = create(user, model="tenant-model")
    assert answer.status_code == 201, answer.content
    run_until_idle()
    task = AgentTask.objects.get(pk=answer.json()["id"])
    assert task.status == "failed"
    assert "may only be sent to api.example.com, not to 127.0.0.1" in task.error
    assert models.requests == []
