"""Flat operator pages (issue 24): indexes for the lists' order and filters, trigram
indexes for the error search, no ``(task_id)``/``(owner_id)`` index that duplicates the
first column of another, and ``agents_step_before`` (migration 0006) returning the
chain head's hash as hex now that it is stored as bytes (``audit.0006``).

The trigram indexes (``pg_trgm``, a trusted extension since PostgreSQL 13) are on
``UPPER(error)``, the expression Django's ``icontains`` compares, so a search reads the
index, not the table. PostgreSQL only (the demo's SQLite has no such index).
"""

import django.db.models.deletion
import uuid6
from django.conf import settings
from django.db import migrations, models


STEP_BEFORE = """
CREATE OR REPLACE FUNCTION agents_step_before(task uuid, step integer) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found jsonb;
BEGIN
    SELECT jsonb_build_array(
               t.audit_seq,
               (SELECT coalesce(encode(a.hash, 'hex'), '') FROM audit_auditevent AS a
                 WHERE a.task_id = t.id AND a.seq = t.audit_seq),
               (SELECT jsonb_build_array(c.state, c.observations, c.schema_version)
                  FROM agents_checkpoint AS c
                 WHERE c.task_id = t.id AND c.step = agents_step_before.step - 1))
      INTO found
      FROM agents_agenttask AS t
     WHERE t.id = agents_step_before.task;
    RETURN found;
END;
$$;
"""
TRIGRAMS = [
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS agent_task_error_trgm ON agents_agenttask"
    " USING gin (UPPER(error) gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS dead_letter_error_trgm ON audit_deadletter"
    " USING gin (UPPER(error) gin_trgm_ops)",
]
NO_TRIGRAMS = [
    "DROP INDEX IF EXISTS agent_task_error_trgm",
    "DROP INDEX IF EXISTS dead_letter_error_trgm",
]


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(STEP_BEFORE, params=None)
        for statement in TRIGRAMS:
            schema_editor.execute(statement)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        old = STEP_BEFORE.replace("coalesce(encode(a.hash, 'hex'), '')", "a.hash")
        schema_editor.execute(old, params=None)
        for statement in NO_TRIGRAMS:
            schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0014_retention_legal_hold"),
        ("audit", "0009_growth_digest_bytes"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        # New task ids are UUIDv7 (time-ordered); the column is unchanged.
        migrations.AlterField(
            model_name="agenttask",
            name="id",
            field=models.UUIDField(
                default=uuid6.uuid7, editable=False, primary_key=True, serialize=False
            ),
        ),
        migrations.AlterField(
            model_name="agenttask",
            name="owner",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="agent_tasks",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.AlterField(
            model_name="checkpoint",
            name="task",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="checkpoints",
                to="agents.agenttask",
            ),
        ),
        migrations.AlterField(
            model_name="suspension",
            name="task",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="suspensions",
                to="agents.agenttask",
            ),
        ),
        migrations.AddIndex(
            model_name="agenttask",
            index=models.Index(fields=["-created_at", "-id"], name="agent_task_created"),
        ),
        migrations.AddIndex(
            model_name="agenttask",
            index=models.Index(
                fields=["status", "-created_at", "-id"], name="agent_task_status_created"
            ),
        ),
        migrations.AddIndex(
            model_name="agenttask",
            index=models.Index(
                fields=["agent_name", "-created_at", "-id"], name="agent_task_agent_created"
            ),
        ),
        migrations.RunPython(forwards, backwards),
    ]
