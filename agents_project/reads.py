"""Reads whose SQL is built once per process, for the few queries a model call's steps
run many times a second (the recorded reply by its key, a range of the conversation).

Django builds and compiles a QuerySet's SQL again on every evaluation: a third of a
millisecond of CPU for a one-table filter, paid by every step. ``Select`` keeps the
statement text (so psycopg also prepares it server-side, ``prepare_threshold``) and the
compiler's value converters, and builds model instances as the ORM does
(``Model.from_db``), so callers get the same objects as from a QuerySet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from django.db import connections, models

M = TypeVar("M", bound=models.Model)


class Select(Generic[M]):
    """``SELECT <every concrete column> FROM <model's table> WHERE <where> <tail>``.

    ``where`` and ``tail`` are SQL with ``%s`` placeholders and the model's column
    names; ``params`` names the field each placeholder is compared with, in order, so
    that a value is prepared for the database as the ORM prepares it (a UUID is text on
    SQLite). E.g. ``Select(ModelCall, "key = %s", params=("key",), tail="LIMIT 1")``.
    Portable SQL only: it runs on PostgreSQL and on the demo's SQLite.
    """

    def __init__(
        self, model: type[M], where: str, *, params: Sequence[str], tail: str = ""
    ) -> None:
        self.model = model
        self.where = where
        self.tail = tail
        self.fields = list(model._meta.concrete_fields)
        self.names = [f.attname for f in self.fields]
        self.params: list[Any] = [model._meta.get_field(name) for name in params]
        if where.count("%s") + tail.count("%s") != len(self.params):
            raise ValueError(f"{where!r} {tail!r}: one field name per placeholder")
        self._compiled: dict[str, tuple[str, Any, dict[int, Any]]] = {}

    def _compile(self, alias: str) -> tuple[str, Any, dict[int, Any]]:
        found = self._compiled.get(alias)
        if found is None:
            connection = connections[alias]
            quote = connection.ops.quote_name
            table = self.model._meta.db_table
            columns = ", ".join(f"{quote(table)}.{quote(str(f.column))}" for f in self.fields)
            sql = f"SELECT {columns} FROM {quote(table)} WHERE {self.where} {self.tail}"
            compiler = self.model._default_manager.all().query.get_compiler(using=alias)
            converters = compiler.get_converters([f.get_col(table) for f in self.fields])
            found = (sql.strip(), compiler, converters)
            self._compiled[alias] = found
        return found

    def all(self, params: Sequence[Any], *, using: str = "default") -> list[M]:
        """The matching rows as model instances, in the statement's order."""
        sql, compiler, converters = self._compile(using)
        connection = connections[using]
        values = [
            field.get_db_prep_value(value, connection)
            for field, value in zip(self.params, params, strict=True)
        ]
        with connection.cursor() as cursor:
            cursor.execute(sql, values)
            rows = cursor.fetchall()
        if converters:
            rows = list(compiler.apply_converters(rows, converters))
        return [self.model.from_db(using, self.names, list(row)) for row in rows]

    def first(self, params: Sequence[Any], *, using: str = "default") -> M | None:
        """The first matching row, or None (put the LIMIT in ``tail``)."""
        rows = self.all(params, using=using)
        return rows[0] if rows else None
