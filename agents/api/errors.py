"""One mapping from every refusal to an HTTP error, with one body shape.

``{"error": CODE, "detail": TEXT, "field": PATH?, ...}``: ``field`` names the input at
fault (``input.script[0].think``), so a client can point at it. Services raise
``ApplicationError`` subclasses; DRF raises its own (validation, authentication,
throttling, parsing); both leave here looking the same.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from agents_project.errors import ApplicationError, Backpressure

logger = structlog.get_logger(__name__)


class PayloadTooLarge(exceptions.APIException):
    status_code = 413
    default_code = "payload_too_large"
    default_detail = "The request body is too large."


class Unavailable(exceptions.APIException):
    """A dependency the answer needs (Redis, the broker) cannot be reached now."""

    status_code = 503
    default_code = "unavailable"
    default_detail = "A dependency is unavailable; try again shortly."


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's ``EXCEPTION_HANDLER``. ``None`` (anything else) is a bug: Django's 500."""
    request = context.get("request")
    path = request.path if request is not None else ""
    if isinstance(exc, ApplicationError):
        logger.info(
            "request refused", path=path, error=exc.code, detail=exc.message, field=exc.field
        )
        response = Response(exc.as_dict(), status=exc.status_code)
        if isinstance(exc, Backpressure):
            response["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return response
    if isinstance(exc, exceptions.ValidationError):
        response.data = _validation_body(exc.detail)
    else:
        body: dict[str, Any] = {"error": _code(exc), "detail": str(exc.detail)}
        if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
            body["retry_after"] = int(exc.wait)
        response.data = body
    return response


def _code(exc: exceptions.APIException) -> str:
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


def _validation_body(detail: Any) -> dict[str, Any]:
    errors = dict(_flatten(detail, ""))
    field, messages = next(iter(errors.items()), ("", ["invalid"]))
    body: dict[str, Any] = {
        "error": "invalid",
        "detail": messages[0],
        "errors": errors,
    }
    if field:
        body["field"] = field
    return body


def _flatten(detail: Any, path: str) -> list[tuple[str, list[str]]]:
    """``{"input": {"a": ["bad"]}}`` -> ``[("input.a", ["bad"])]``; list items as ``[i]``."""
    if isinstance(detail, dict):
        pairs: list[tuple[str, list[str]]] = []
        for key, value in detail.items():
            name = "" if key == "non_field_errors" else str(key)
            pairs += _flatten(value, f"{path}.{name}" if path and name else path or name)
        return pairs
    if isinstance(detail, list) and any(isinstance(item, dict | list) for item in detail):
        pairs = []
        for index, value in enumerate(detail):
            if value:
                pairs += _flatten(value, f"{path}[{index}]")
        return pairs
    if isinstance(detail, list):
        return [(path, [str(item) for item in detail])]
    return [(path, [str(detail)])]
