"""``python manage.py db_app_role``: make the database role web and workers run as.

Run by the table owner (the role that migrates) after every ``migrate``, as
docker/compose.yaml's ``migrate`` service and docker/k8s/migrate-job.yaml do. The app
role (the user of ``APP_DATABASE_URL``, or ``--role``) gets read and write on every
table of the schema, except:

- ``audit_auditevent`` (and each of its monthly partitions), ``audit_taskremoval`` and
  ``audit_auditpartitionremoval`` (retention's removal records): SELECT and INSERT
  only (no UPDATE, DELETE or TRUNCATE), and as it does not own them it cannot disable
  their append-only triggers either; retention removes a task's events only through
  ``audit_events_remove`` and ``audit_partition_drop`` (migrations ``audit.0007``,
  ``audit.0011``);
- ``audit_auditchainstart`` and ``django_migrations``: SELECT only.

The role is created (LOGIN, with the URL's password) when it does not exist, and its
password set to the URL's when it does. A role that is a superuser, or that owns a table
of the schema, is refused: it could undo all of the above.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from psycopg import sql

ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Tables the app reads but never writes (besides the audit trail, which it appends to).
READ_ONLY_TABLES = ("audit_auditchainstart", "django_migrations")
AUDIT_TABLE = "audit_auditevent"
# Tables the app may only append to.
APPEND_ONLY_TABLES = (AUDIT_TABLE, "audit_taskremoval", "audit_auditpartitionremoval")


def app_role_from_url(url: str) -> tuple[str, str]:
    """(user, password) of a ``postgres://user:password@host/db`` URL; ``CommandError``
    naming ``APP_DATABASE_URL`` when it has no user."""
    parts = urlsplit(url)
    if not parts.username:
        raise CommandError("APP_DATABASE_URL: names no user (postgres://USER:PASSWORD@HOST/DB)")
    return unquote(parts.username), unquote(parts.password or "")


def _literal(value: str) -> str:
    """``value`` as an SQL string literal (utility statements take no parameters)."""
    return sql.Literal(value).as_string(connection.connection)


class Command(BaseCommand):
    help = (
        "Create or update the database role of web and workers (APP_DATABASE_URL's user): "
        "read and write everywhere, but only SELECT and INSERT on the audit trail. Run as "
        "the table owner after every migrate."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--role", default=None, help="the role's name (default: APP_DATABASE_URL's user)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError("db_app_role needs PostgreSQL")
        url = os.environ.get("APP_DATABASE_URL", "")
        role, password = app_role_from_url(url) if url else ("", "")
        role = options["role"] or role
        if not role:
            raise CommandError("give --role or set APP_DATABASE_URL")
        if not ROLE_NAME.match(role):
            raise CommandError(f"--role: {role!r} is not a plain role name")
        quoted = connection.ops.quote_name(role)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT current_user, current_database()")
            owner, database = cursor.fetchone()
            if role == owner:
                raise CommandError(
                    f"{role} is the role running this command (the tables' owner): the app "
                    "must run as another role"
                )
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role])
            found = cursor.fetchone()
            if found is None:
                if not password:
                    raise CommandError(
                        f"role {role} does not exist: give its password in APP_DATABASE_URL"
                    )
                cursor.execute(f"CREATE ROLE {quoted} LOGIN PASSWORD {_literal(password)}")
            elif found[0]:
                raise CommandError(f"role {role} is a superuser: it could undo every grant")
            elif password:
                cursor.execute(f"ALTER ROLE {quoted} LOGIN PASSWORD {_literal(password)}")
            cursor.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tableowner = %s",
                [role],
            )
            owned = [row[0] for row in cursor.fetchall()]
            if owned:
                raise CommandError(
                    f"role {role} owns {', '.join(sorted(owned)[:5])}: it could disable the "
                    "audit trail's trigger. Make the migrating role own every table."
                )
            statements = [
                f"GRANT CONNECT ON DATABASE {connection.ops.quote_name(database)} TO {quoted}",
                f"GRANT USAGE ON SCHEMA public TO {quoted}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}",
                f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
            ]
            # The trail's partitions (audit.0011) are tables too, which GRANT ... ON ALL
            # TABLES reached: the same as their parent. Those made later get no grant.
            cursor.execute(
                "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = to_regclass(%s)",
                [AUDIT_TABLE],
            )
            partitions = [row[0] for row in cursor.fetchall()]
            statements += [
                f"REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {table} FROM {quoted}"
                for table in (*APPEND_ONLY_TABLES, *partitions)
            ]
            statements += [
                f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {table} FROM {quoted}"
                for table in READ_ONLY_TABLES
            ]
            for statement in statements:
                cursor.execute(statement)
        self.stdout.write(
            f"role {role}: read and write on every table of {database}, SELECT and INSERT "
            f"only on {', '.join(APPEND_ONLY_TABLES)}, SELECT only on {', '.join(READ_ONLY_TABLES)}"
        )
