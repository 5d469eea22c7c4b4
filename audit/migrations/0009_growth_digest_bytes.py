"""Audit hashes as 32 bytes (``bytea``) instead of 64 hex characters, converted in place;
the ``(task_id)`` index that duplicates the first column of ``(task_id, seq)`` dropped;
a partial index for a task's last error.

On PostgreSQL the column's type changes with ``decode(.., 'hex')`` (``ALTER TABLE``
rewrites the table without firing the append-only trigger, which refuses row UPDATEs:
the events' content, and so their chain, is unchanged; "" becomes NULL). On SQLite (the
demo) the column keeps its type: ``DigestField`` reads hex text and bytes alike.
"""

import django.db.models.deletion
from django.db import migrations, models

import audit.models

TO_BYTES = """
ALTER TABLE audit_auditevent
    ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL,
    ALTER COLUMN prev_hash TYPE bytea USING decode(NULLIF(prev_hash, ''), 'hex'),
    ALTER COLUMN hash TYPE bytea USING decode(NULLIF(hash, ''), 'hex')
"""
TO_HEX = """
ALTER TABLE audit_auditevent
    ALTER COLUMN prev_hash TYPE varchar(64) USING coalesce(encode(prev_hash, 'hex'), ''),
    ALTER COLUMN hash TYPE varchar(64) USING coalesce(encode(hash, 'hex'), ''),
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TO_BYTES)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(TO_HEX)


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0014_retention_legal_hold"),
        ("audit", "0008_event_types_merged"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AlterField(
                    model_name="auditevent",
                    name="hash",
                    field=audit.models.DigestField(blank=True, default="", null=True),
                ),
                migrations.AlterField(
                    model_name="auditevent",
                    name="prev_hash",
                    field=audit.models.DigestField(blank=True, default="", null=True),
                ),
            ],
        ),
        migrations.AlterField(
            model_name="auditevent",
            name="task",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="audit_events",
                to="agents.agenttask",
            ),
        ),
        migrations.AddIndex(
            model_name="auditevent",
            index=models.Index(
                models.F("task"),
                models.OrderBy(models.F("seq"), descending=True),
                condition=models.Q(
                    ("type__in", ("step_failed", "dead_lettered", "schema_refused", "worker_lost"))
                ),
                name="audit_event_task_errors",
            ),
        ),
    ]
