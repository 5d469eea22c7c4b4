"""Admin lists that cost the same on page 1 and page 1,000, with a million rows.

Django's change list counts every matching row (``COUNT(*)``, twice with
``show_full_result_count``) and reaches page N with ``OFFSET``, which reads and throws
away every row before it (and computes each of their annotations). ``KeysetChangeList``
instead:

- pages by key (keyset, or "seek", pagination): the page after the one shown is the rows
  ordered after its last row, ``?after=<cursor>``, one index range per page however deep
  (Markus Winand, "We need tool support for keyset pagination"). Used when the list's
  ordering is plain columns all in one direction (the default orders are); any other
  ordering an operator clicks falls back to numbered pages;
- shows an estimated count: PostgreSQL's own row estimate of the table
  (``pg_class.reltuples``) when nothing narrows the list; for a search alone, the
  model admin's ``search_estimate`` when it has one over ``COUNT_LIMIT`` (a search that
  matches much of a large table would cost more to count than to page); else the rows
  counted up to ``COUNT_LIMIT`` ("over 1,000"). A search's first page with no next one
  shows its own rows' count, whatever was estimated.

Use it with ``KeysetAdminMixin`` on a ``ModelAdmin``; the list's template shows
``cl.next_page_url`` / ``cl.first_page_url`` and ``cl.count_text``.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property

from agents_project.estimates import table_estimate

CURSOR_VAR = "after"
# A narrowed list counts its rows up to this many (then says "over ...").
COUNT_LIMIT = 1000


def bounded_count(rows: QuerySet[Any], limit: int = COUNT_LIMIT) -> int:
    """How many of ``rows`` there are, counting at most ``limit + 1``."""
    return rows.order_by().values("pk")[: limit + 1].count()


class EstimatedPaginator(Paginator):
    """Django's paginator with the count of ``KeysetChangeList`` (for numbered pages)."""

    def __init__(self, *args: Any, estimate: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._estimate = estimate

    @cached_property
    def count(self) -> int:
        return self._estimate


def _encode(values: list[Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return {"t": value.isoformat()}
        if isinstance(value, UUID | Decimal):
            return str(value)
        return value

    text = json.dumps([plain(v) for v in values], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str, count: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        raise IncorrectLookupParameters(f"{CURSOR_VAR}: not a page cursor") from None
    if not isinstance(values, list) or len(values) != count:
        raise IncorrectLookupParameters(f"{CURSOR_VAR}: not a page cursor")
    return [datetime.fromisoformat(v["t"]) if isinstance(v, dict) else v for v in values]


def after_key(fields: list[str], values: list[Any], *, descending: bool) -> Q:
    """Rows that come after ``values`` in the order of ``fields`` (all one direction).

    ``(a, b) < (x, y)`` spelled as ``a <= x AND (a < x OR (a = x AND b < y))``: the first
    term is the index range's bound, so PostgreSQL starts the scan at the cursor.
    """
    before, strictly = ("lte", "lt") if descending else ("gte", "gt")
    alternatives = Q()
    for i, field in enumerate(fields):
        equal = {name: value for name, value in zip(fields[:i], values[:i], strict=True)}
        alternatives |= Q(**equal, **{f"{field}__{strictly}": values[i]})
    return Q(**{f"{fields[0]}__{before}": values[0]}) & alternatives


class KeysetChangeList(ChangeList):
    """A change list paged by key and counted by estimate (see the module docstring)."""

    next_page_url: str | None = None
    first_page_url: str | None = None
    count_text: str = ""
    search_estimated = False

    def get_filters_params(self, params: Any = None) -> Any:
        lookup = super().get_filters_params(params)
        lookup.pop(CURSOR_VAR, None)
        return lookup

    def _key_fields(self) -> tuple[list[str], bool] | None:
        """The ordering as ``(column names, descending)`` when it can be paged by key."""
        order = [str(o) for o in self.queryset.query.order_by]
        if not order or any(not isinstance(o, str) for o in self.queryset.query.order_by):
            return None
        descending = order[0].startswith("-")
        names = []
        for item in order:
            if item.startswith("-") != descending or "__" in item or "?" in item:
                return None
            name = item.lstrip("-")
            if name == "pk":
                name = self.model._meta.pk.attname
            try:
                field = self.model._meta.get_field(name)
            except Exception:
                return None
            if field.is_relation and not field.many_to_one:
                return None
            column = getattr(field, "attname", name)
            if column not in names:
                names.append(column)
        return names, descending

    def _estimate(self, request: HttpRequest) -> int:
        narrowed = self.has_filters_applied() or bool(self.query)
        if not narrowed:
            estimate = table_estimate(self.model)
            if estimate is not None and estimate >= COUNT_LIMIT:
                self.count_text = f"about {estimate:,}"
                return estimate
        elif self.query and not self.has_filters_applied():
            estimate_search = getattr(self.model_admin, "search_estimate", None)
            estimate = estimate_search(request, self.query) if estimate_search else None
            if estimate is not None and estimate > COUNT_LIMIT:
                self.count_text = f"about {estimate:,}"
                self.search_estimated = True
                return estimate
        counted = bounded_count(self.queryset)
        self.count_text = f"over {COUNT_LIMIT:,}" if counted > COUNT_LIMIT else f"{counted:,}"
        return counted

    def has_filters_applied(self) -> bool:
        return bool(self.has_active_filters) or bool(self.get_filters_params())

    def get_results(self, request: HttpRequest) -> None:
        keyed = self._key_fields()
        cursor = request.GET.get(CURSOR_VAR)
        estimate = self._estimate(request)
        self.result_count = estimate
        self.full_result_count = None
        self.show_full_result_count = False
        self.show_admin_actions = True
        self.can_show_all = False
        self.show_all = False
        if keyed is None:
            # An ordering no key serves: numbered pages over the estimated count.
            self.paginator = EstimatedPaginator(
                self.queryset, self.list_per_page, estimate=estimate
            )
            self.multi_page = estimate > self.list_per_page
            try:
                self.result_list = self.paginator.page(self.page_num).object_list
            except Exception:
                raise IncorrectLookupParameters from None
            return
        fields, descending = keyed
        rows = self.queryset
        if cursor:
            rows = rows.filter(
                after_key(fields, _decode(cursor, len(fields)), descending=descending)
            )
        page = list(rows[: self.list_per_page + 1])
        more = len(page) > self.list_per_page
        if not cursor and not more and self.search_estimated:
            estimate = self.result_count = len(page)  # all it found: no estimate needed
            self.count_text = f"{estimate:,}"
        self.result_list = page[: self.list_per_page]
        self.paginator = EstimatedPaginator(self.queryset, self.list_per_page, estimate=estimate)
        self.multi_page = more or bool(cursor)
        if more:
            last = self.result_list[-1]
            key = _encode([getattr(last, f) for f in fields])
            self.next_page_url = self.get_query_string({CURSOR_VAR: key}, [PAGE_VAR])
        if cursor:
            self.first_page_url = self.get_query_string(remove=[CURSOR_VAR, PAGE_VAR])


class KeysetAdminMixin:
    """For a ``ModelAdmin``: its list is a ``KeysetChangeList``, counted by estimate."""

    show_full_result_count = False

    def search_estimate(self, request: HttpRequest, search_term: str) -> int | None:
        """The planner's estimate of the rows ``search_term`` finds, when it can tell
        without counting them; None (this default): count them, up to ``COUNT_LIMIT``."""
        return None

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return KeysetChangeList
