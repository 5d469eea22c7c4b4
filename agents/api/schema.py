"""OpenAPI details drf-spectacular cannot infer: the error responses every operation
shares, in the one ``Error`` shape ``agents.api.errors`` produces."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse

from agents.api.serializers import ErrorSerializer

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "A stable code: invalid, not_found..."},
        "detail": {"type": "string", "description": "What is wrong, for a person."},
        "field": {"type": "string", "description": "The input at fault, as a path."},
    },
    "required": ["error", "detail"],
}
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer"},
        "description": "Seconds to wait before trying again.",
    }
}
_DESCRIPTIONS = {
    400: "Invalid request; `field` names the input at fault.",
    401: "Not authenticated (send `Authorization: Token <key>`).",
    403: "Authenticated, but not allowed.",
    404: "No such object visible to you (another user's task is a 404 too).",
    409: "The object's current state refuses this (e.g. the task has ended).",
    413: "The request body is too large.",
    415: "The request body is not JSON.",
    429: "Too many requests from this user; see Retry-After.",
    503: "The work queue cannot take more work now; nothing was created. See Retry-After.",
}


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Error responses for ``extend_schema(responses=...)``."""
    return {
        code: OpenApiResponse(ErrorSerializer, description=_DESCRIPTIONS[code]) for code in codes
    }


# What a client can do next with a task it was given (OpenAPI links, which tools such
# as schemathesis follow): every task operation, with the id from the response.
_TASK_OPERATIONS = (
    "tasks_retrieve",
    "tasks_audit_retrieve",
    "tasks_checkpoints_retrieve",
    "tasks_approve_create",
    "tasks_signal_create",
    "tasks_cancel_create",
    "tasks_replay_create",
)
_TASK_LINKS = {
    name: {"operationId": name, "parameters": {"id": "$response.body#/id"}}
    for name in _TASK_OPERATIONS
}
_LINKS = {
    ("tasks_create", "201"): _TASK_LINKS,
    ("tasks_create", "200"): _TASK_LINKS,
    ("tasks_replay_create", "201"): _TASK_LINKS,
    ("tasks_approve_create", "200"): _TASK_LINKS,
    ("dead_letters_list", "200"): {
        "dead_letters_requeue_create": {
            "operationId": "dead_letters_requeue_create",
            "parameters": {"id": "$response.body#/results/0/id"},
        }
    },
}


def add_common_error_responses(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: document what any operation may answer, and
    the links from a task to what can be done with it."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name, schema in schemas.items():
        if name.endswith("Request"):
            schema["additionalProperties"] = False  # see RequestSerializer
    for methods in result.get("paths", {}).values():
        for operation in methods.values():
            for (operation_id, status), links in _LINKS.items():
                if operation.get("operationId") == operation_id:
                    operation["responses"][status]["links"] = links
            codes = [401, 403, 429]
            parameters = operation.get("parameters", [])
            if any(p.get("in") == "path" for p in parameters):
                codes.append(404)
            if "requestBody" in operation:
                codes += [400, 413, 415]
            elif any(p.get("in") == "query" for p in parameters):
                codes.append(400)
            responses = operation.setdefault("responses", {})
            for code in codes:
                responses.setdefault(str(code), _error_response(code))
            for waiting in ("429", "503"):
                if waiting in responses:
                    responses[waiting].setdefault("headers", RETRY_AFTER)
    return result


def _error_response(code: int) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS[code],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
