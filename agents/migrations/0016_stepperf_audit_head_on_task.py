"""The audit chain's head on the task row, for a step's claim (``agents_step_before``).

Since ``audit.0011`` the trail is partitioned by month of ``created_at``, and a claim
looked its head event up by ``(task_id, seq)``, which names no month: every partition
was probed (one index scan each, from the oldest month kept to three months ahead, plus
the DEFAULT partition) and locked, on every step, more of them every month.

The step engine's hot path (``agents.core.commit``) now also writes, in the statement
that inserts a step's events, the last one's number and hash: ``audit_head_seq``,
``audit_head_hash``. Only that path writes them; any other writer of events moves
``audit_seq`` past ``audit_head_seq``, so the pair is used only while the two are
equal, and otherwise the function reads the head in the trail as before. A task made
before this migration has neither until its next step's commit.
"""

import audit.models
from django.db import migrations, models

STEP_BEFORE = """
CREATE OR REPLACE FUNCTION agents_step_before(task uuid, step integer) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last_seq integer;
    cached_seq integer;
    head text;
    saved jsonb;
BEGIN
    SELECT t.audit_seq, t.audit_head_seq, coalesce(encode(t.audit_head_hash, 'hex'), ''),
           (SELECT jsonb_build_array(c.state, c.observations, c.schema_version)
              FROM agents_checkpoint AS c
             WHERE c.task_id = t.id AND c.step = agents_step_before.step - 1)
      INTO last_seq, cached_seq, head, saved
      FROM agents_agenttask AS t
     WHERE t.id = agents_step_before.task;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF cached_seq IS DISTINCT FROM last_seq THEN
        -- Planned on first use only: a claim that finds the head on the row never
        -- opens the trail's partitions. No row: NULL (the caller reads it again).
        SELECT coalesce(encode(a.hash, 'hex'), '') INTO head
          FROM audit_auditevent AS a
         WHERE a.task_id = agents_step_before.task AND a.seq = last_seq;
    END IF;
    RETURN jsonb_build_array(last_seq, head, saved);
END;
$$;
"""

# As agents.0015 left it.
STEP_BEFORE_0015 = """
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


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(STEP_BEFORE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(STEP_BEFORE_0015, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0015_growth_flat_pages"),
        ("audit", "0011_partition_audit_events"),
    ]

    operations = [
        migrations.AddField(
            model_name="agenttask",
            name="audit_head_seq",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="agenttask",
            name="audit_head_hash",
            field=audit.models.DigestField(blank=True, default="", null=True),
        ),
        migrations.RunPython(forwards, backwards),
    ]
