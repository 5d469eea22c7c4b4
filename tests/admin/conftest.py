"""Console users: an operator (superuser) and a staff member who may only read tasks."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser(username="ops", password="pw-ops")


@pytest.fixture
def reader(django_user_model):
    user = django_user_model.objects.create_user(username="reader", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=("view_agenttask", "view_auditevent", "view_deadletter")
        )
    )
    return user


@pytest.fixture
def ops_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def reader_client(client, reader):
    client.force_login(reader)
    return client
