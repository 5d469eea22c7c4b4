"""Row counts from PostgreSQL's planner statistics, for pages and gauges that must not
count a large table on every request.

``ANALYZE`` (run by autovacuum as a table changes) keeps ``pg_class.reltuples``, the
table's row estimate, and ``pg_stats``, the most common values of each column with
their frequencies, from a sample of 30,000 rows (PostgreSQL manual, "Statistics Used by
the Planner"). Their lag is autovacuum's: on a busy table, minutes.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import connection, connections
from django.db.models import Model, QuerySet


def table_estimate(model: type[Model]) -> int | None:
    """The table's estimated rows, or None where there is none (SQLite; a table never
    analyzed)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [model._meta.db_table],
        )
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] >= 0 else None


def value_estimates(model: type[Model], column: str) -> dict[str, int] | None:
    """Estimated rows per value of ``column`` (its most common values in ``pg_stats``
    times the table's estimate), or None where there are no statistics."""
    total = table_estimate(model)
    if total is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats"
            " WHERE schemaname = current_schema() AND tablename = %s AND attname = %s",
            [model._meta.db_table, column],
        )
        row = cursor.fetchone()
    if row is None or row[0] is None:
        return None
    return {value: round(total * freq) for value, freq in zip(row[0], row[1], strict=True)}


def query_estimate(rows: QuerySet[Any]) -> int | None:
    """The planner's estimate of how many rows ``rows`` returns (``EXPLAIN``: planned,
    not run; about a millisecond), or None where there is none (SQLite)."""
    db = connections[rows.db]
    if db.vendor != "postgresql":
        return None
    sql, params = rows.query.sql_with_params()
    with db.cursor() as cursor:
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        row = cursor.fetchone()
    plan = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    return int(plan[0]["Plan"]["Plan Rows"])
