"""Legal hold, and a trigger that refuses to delete a task row that is held or not in a
final status (completed, failed, timed_out, cancelled): retention (agents.retention) is
the only code that deletes tasks, and not even a bug in it can remove a live or held one.
"""

from django.db import migrations, models

CREATE = """
CREATE OR REPLACE FUNCTION agent_task_delete_guard() RETURNS trigger AS $$
BEGIN
    IF OLD.legal_hold THEN
        RAISE EXCEPTION 'task % is under legal hold: it cannot be removed', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF OLD.status NOT IN ('completed', 'failed', 'timed_out', 'cancelled') THEN
        RAISE EXCEPTION 'task % is %: only finished tasks can be removed', OLD.id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER agent_task_delete_guard
    BEFORE DELETE ON agents_agenttask
    FOR EACH ROW EXECUTE FUNCTION agent_task_delete_guard();
"""
DROP = """
DROP TRIGGER IF EXISTS agent_task_delete_guard ON agents_agenttask;
DROP FUNCTION IF EXISTS agent_task_delete_guard();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):

    dependencies = [
        ('agents', '0013_suspension_resolutions_merged'),
    ]

    operations = [
        migrations.AddField(
            model_name='agenttask',
            name='legal_hold',
            field=models.BooleanField(default=False),
        ),
        migrations.AlterModelOptions(
            name="agenttask",
            options={
                "ordering": ["-created_at"],
                "permissions": [
                    ("hold_agenttask", "Can place and release a legal hold on a task")
                ],
            },
        ),
        migrations.RunPython(forwards, backwards),
    ]
