"""Paging: opaque cursors for lists that grow at the top (tasks, dead letters), and a
plain ``after`` key for ordered trails (audit events by seq, checkpoints by step)."""

from __future__ import annotations

from typing import Any

from django.db.models import Model, QuerySet
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer
from rest_framework.utils.urls import replace_query_param


class NewestFirstPagination(CursorPagination):
    """Newest first; a cursor stays valid while new rows arrive. ``page_size`` 1..200."""

    ordering = "-created_at"
    page_size_query_param = "page_size"
    max_page_size = 200

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not raw.isdigit() or not 1 <= int(raw) <= self.max_page_size:
            raise ValidationError(
                {self.page_size_query_param: [f"must be from 1 to {self.max_page_size}"]}
            )
        return int(raw)

    def decode_cursor(self, request: Request) -> Any:
        # DRF answers a bad cursor with 404; it is a bad query parameter.
        try:
            return super().decode_cursor(request)
        except NotFound:
            raise ValidationError(
                {self.cursor_query_param: [self.invalid_cursor_message]}
            ) from None

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.max_page_size,
                }
        return parameters


def seek_page(
    request: Request,
    rows: QuerySet[Any],
    *,
    key: str,
    limit: int,
    serializer: type[BaseSerializer[Any]],
) -> Response:
    """Up to ``limit`` of ``rows`` (already ordered by ``key`` and cut at ``after``), and
    the URL of the next page. One indexed range scan per page, however deep."""
    page: list[Model] = list(rows[: limit + 1])
    more = len(page) > limit
    page = page[:limit]
    next_url = None
    if more:
        next_url = replace_query_param(
            request.build_absolute_uri(), "after", getattr(page[-1], key)
        )
    return Response({"results": serializer(page, many=True).data, "next": next_url})
