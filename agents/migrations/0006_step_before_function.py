"""On PostgreSQL, ``agents_step_before(task, step)``: what a claim returns of the step
before ``step`` (``agents.core.leases``), read with a snapshot of its own.

A claim's ``UPDATE`` often waits for the commit of the step before it (whose message
was published inside that commit). Subqueries of the ``UPDATE`` read the tables as they
were when it started, before that commit; a VOLATILE function's queries take a fresh
snapshot each (PostgreSQL manual, "Function Volatility Categories"), so called from the
``RETURNING`` list it sees what the commit wrote, and the claim needs no second read.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION agents_step_before(task uuid, step integer) RETURNS jsonb
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    found jsonb;
BEGIN
    SELECT jsonb_build_array(
               t.audit_seq,
               (SELECT a.hash FROM audit_auditevent AS a
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
DROP = "DROP FUNCTION IF EXISTS agents_step_before(uuid, integer);"


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("agents", "0005_fair_sharing"), ("audit", "0004_model_call_event")]
    operations = [migrations.RunPython(forwards, backwards)]
