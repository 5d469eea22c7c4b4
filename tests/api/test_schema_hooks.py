"""The two-tenant schemathesis check itself fails where it should (``schemathesis_hooks``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.api import schemathesis_hooks

FOREIGN = "6f1c7a52-1111-4222-8333-944455556666"


@dataclass
class _Request:
    url: str = "http://testserver/api/tasks/"


@dataclass
class _Response:
    status_code: int
    text: str
    request: _Request = field(default_factory=_Request)


@dataclass
class _Case:
    body: Any = None


@pytest.fixture(autouse=True)
def _foreign(monkeypatch):
    monkeypatch.setenv("SCHEMA_FOREIGN_TASK_IDS", FOREIGN)
    monkeypatch.setenv("SCHEMA_FOREIGN_MARKER", "alice-private-x")
    monkeypatch.delenv("SCHEMA_CHECK_LOG", raising=False)


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (200, f'{{"results": [{{"id": "{FOREIGN}"}}]}}'),
        (201, f'{{"replayed_from": "{FOREIGN}"}}'),
        (404, '{"detail": "alice-private-x"}'),
    ],
)
def test_the_check_fails_on_another_tenants_data(status, text):
    with pytest.raises(AssertionError):
        schemathesis_hooks.no_cross_tenant_read(None, _Response(status, text), _Case())


@pytest.mark.parametrize(
    ("status", "text"),
    [(404, f'{{"detail": "no task {FOREIGN}"}}'), (200, '{"results": []}')],
)
def test_the_check_passes_a_refusal_that_echoes_the_id_and_own_data(status, text):
    schemathesis_hooks.no_cross_tenant_read(None, _Response(status, text), _Case())


def test_a_deep_body_is_sent_as_text_with_the_value_spliced_in():
    kwargs: dict[str, Any] = {}
    schemathesis_hooks.before_call(None, _Case({"input": "__deep_list_10000__"}), kwargs)
    assert kwargs["data"].startswith(b'{"input": [[[[')
    assert kwargs["data"].count(b"[") == 10_000
