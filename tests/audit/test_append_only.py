"""The audit trail cannot be rewritten, not even by code that tries."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, transaction

from agents.services import task_start
from agents_project.redaction import MASK, redact
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)


def test_audit_events_cannot_be_updated_or_deleted(user):
    task, _ = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})
    event = AuditEvent.objects.get(task=task)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(type="transition")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()
    assert AuditEvent.objects.get(pk=event.pk).type == "created"


def test_secret_looking_keys_and_known_secrets_are_masked():
    payload = {
        "args": {"url": "https://x/?q=1", "api_key": "k-123", "nested": [{"password": "p"}]},
        "note": "token is s3cr3t-value here",
    }
    clean = redact(payload, secrets=["s3cr3t-value"])
    assert clean["args"]["api_key"] == MASK
    assert clean["args"]["nested"][0]["password"] == MASK
    assert clean["args"]["url"] == "https://x/?q=1"
    assert clean["note"] == f"token is {MASK} here"
    assert payload["args"]["api_key"] == "k-123", "the input is not modified"
