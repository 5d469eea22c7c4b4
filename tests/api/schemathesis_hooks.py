"""schemathesis hooks for the two-tenant runs (``tests/api/schemathesis_run.py``), loaded by the
CLI through ``SCHEMATHESIS_HOOKS=tests.api.schemathesis_hooks``.

- **Another tenant's ids.** Every path ``{id}`` is also tried with the ids of objects
  another tenant owns (``SCHEMA_FOREIGN_TASK_IDS``, ``SCHEMA_FOREIGN_LETTER_IDS``), so
  reads and actions across tenants are attempted in every phase.
- **Deep nesting.** Every JSON body is also sent with ``input`` (or ``payload``) nested
  65 (just over ``AGENTS_MAX_JSON_DEPTH``) and 10,000 levels deep, as raw text (a JSON
  encoder would refuse such depth before it is sent).
- **The check ``no_cross_tenant_read``** fails a response that carries the other
  tenant's private marker (``SCHEMA_FOREIGN_MARKER``, in every input of theirs) at
  any status, or one of their task ids in a successful (below 400) response.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

DEEP = {
    "__deep_object_65__": ('{"a":' * 65) + "1" + ("}" * 65),
    "__deep_list_10000__": ("[" * 10_000) + "1" + ("]" * 10_000),
    "__deep_object_10000__": ('{"a":' * 10_000) + "1" + ("}" * 10_000),
}


def _ids(name: str) -> list[str]:
    return [value for value in os.environ.get(name, "").split(",") if value]


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any] | None) -> Any:
    if not path_parameters or "id" not in path_parameters:
        return st.just(path_parameters)
    path = ctx.operation.path if ctx.operation is not None else ""
    foreign = _ids(
        "SCHEMA_FOREIGN_LETTER_IDS" if "dead-letters" in path else "SCHEMA_FOREIGN_TASK_IDS"
    )
    return st.sampled_from([path_parameters, *({**path_parameters, "id": f} for f in foreign)])


@schemathesis.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        return st.just(body)
    return st.sampled_from(
        [
            body,
            {**body, "input": "__deep_object_65__"},
            {**body, "input": "__deep_list_10000__"},
            {**body, "payload": "__deep_object_10000__"},
        ]
    )


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Send a body that names a deep value as raw JSON text with that value spliced in."""
    body = case.body
    if not isinstance(body, dict):
        return
    deep = [key for key in ("input", "payload") if isinstance(body.get(key), str)]
    deep = [key for key in deep if body[key] in DEEP]
    if not deep:
        return
    text = json.dumps(body)
    for key in deep:
        text = text.replace(json.dumps(body[key]), DEEP[body[key]], 1)
    kwargs["data"] = text.encode()


@schemathesis.check
def no_cross_tenant_read(ctx: Any, response: Any, case: Any) -> None:
    text = response.text or ""
    _note(response, case)
    marker = os.environ.get("SCHEMA_FOREIGN_MARKER", "")
    if marker and marker in text:
        raise AssertionError(f"the response carries another tenant's data ({marker!r})")
    if response.status_code < 400:
        # Task ids only: a dead letter's id is a small integer (found in any text); its
        # task id is in every representation of it.
        for foreign in _ids("SCHEMA_FOREIGN_TASK_IDS"):
            if foreign in text:
                raise AssertionError(
                    f"a {response.status_code} response names another tenant's object {foreign}"
                )


def _note(response: Any, case: Any) -> None:
    """One line per checked response in ``SCHEMA_CHECK_LOG`` (status, whether the request
    named another tenant's object, whether its body was deeply nested), so the test can
    tell that these cases were really sent."""
    path = os.environ.get("SCHEMA_CHECK_LOG")
    if not path:
        return
    url = str(getattr(response.request, "url", ""))
    foreign = any(f in url for f in _ids("SCHEMA_FOREIGN_TASK_IDS")) or any(
        f"/dead-letters/{f}/" in url for f in _ids("SCHEMA_FOREIGN_LETTER_IDS")
    )
    body = case.body if isinstance(case.body, dict) else {}
    deep = any(isinstance(v, str) and v in DEEP for v in body.values())
    with open(path, "a") as log:
        log.write(f"{response.status_code} {int(foreign)} {int(deep)}\n")
