"""Retention's controlled removal path (agents.retention).

- ``audit_taskremoval`` (TaskRemoval): append-only like the audit trail (UPDATE and
  DELETE refused by a trigger; db_app_role grants the app role SELECT and INSERT only).
- ``audit_events_remove(task uuid)``: the only way to delete audit events. A SECURITY
  DEFINER function (it runs as the table's owner, so the app role, which has no DELETE
  on the trail, can call it) that deletes one task's events only when a TaskRemoval
  record of that task exists and the task's row is already deleted in the same
  transaction (whose own trigger, agents.0010, refused it if it was held or not
  finished). It marks the deletion with a transaction-local setting,
  ``audit.removing`` = the task's id, which the append-only trigger accepts for that
  task's rows alone; UPDATE stays refused.
"""

import django.utils.timezone
from django.db import migrations, models

CREATE = """
CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND OLD.task_id::text = coalesce(current_setting('audit.removing', true), '') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit events are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION audit_record_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_taskremoval_append_only
    BEFORE UPDATE OR DELETE ON audit_taskremoval
    FOR EACH ROW EXECUTE FUNCTION audit_record_append_only();
REVOKE TRUNCATE ON audit_taskremoval FROM PUBLIC, CURRENT_USER;

CREATE OR REPLACE FUNCTION audit_events_remove(p_task uuid) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    removed bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit_taskremoval WHERE task_id = p_task) THEN
        RAISE EXCEPTION 'task % has no removal record: its audit events stay', p_task
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM agents_agenttask WHERE id = p_task) THEN
        RAISE EXCEPTION 'task % still exists: delete its row first', p_task
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM set_config('audit.removing', p_task::text, true);
    DELETE FROM audit_auditevent WHERE task_id = p_task;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('audit.removing', '', true);
    RETURN removed;
END;
$$;
"""
DROP = """
DROP FUNCTION IF EXISTS audit_events_remove(uuid);
DROP TRIGGER IF EXISTS audit_taskremoval_append_only ON audit_taskremoval;
DROP FUNCTION IF EXISTS audit_record_append_only();
CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):

    dependencies = [
        ('audit', '0006_children_event_types'),
        ('agents', '0014_retention_legal_hold'),
    ]

    operations = [
        migrations.CreateModel(
            name='TaskRemoval',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('seq', models.PositiveBigIntegerField(unique=True)),
                ('task_id', models.UUIDField(db_index=True)),
                ('owner', models.CharField(max_length=150)),
                ('agent_name', models.CharField(max_length=100)),
                ('status', models.CharField(max_length=20)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('archive', models.CharField(max_length=500)),
                ('archive_sha256', models.CharField(max_length=64)),
                ('archive_bytes', models.PositiveBigIntegerField()),
                ('counts', models.JSONField(default=dict)),
                ('head_seq', models.PositiveIntegerField()),
                ('head_hash', models.CharField(blank=True, default='', max_length=64)),
                ('policy', models.JSONField(default=dict)),
                ('actor', models.CharField(max_length=200)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('prev_hash', models.CharField(blank=True, default='', max_length=64)),
                ('hash', models.CharField(max_length=64)),
            ],
            options={
                'ordering': ['seq'],
            },
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='type',
            field=models.CharField(choices=[('created', 'Created'), ('transition', 'Transition'), ('reasoning', 'Reasoning'), ('tool_call', 'Tool Call'), ('tool_result', 'Tool Result'), ('step', 'Step'), ('state_migrated', 'State Migrated'), ('schema_refused', 'Schema Refused'), ('step_failed', 'Step Failed'), ('worker_lost', 'Worker Lost'), ('dead_lettered', 'Dead Lettered'), ('requeued', 'Requeued'), ('suspended', 'Suspended'), ('approval_decided', 'Approval Decided'), ('signal_received', 'Signal Received'), ('signal_consumed', 'Signal Consumed'), ('wait_ended', 'Wait Ended'), ('cancel_requested', 'Cancel Requested'), ('replayed_from', 'Replayed From'), ('republished', 'Republished'), ('breaker', 'Breaker'), ('model_call', 'Model Call'), ('legal_hold', 'Legal Hold'), ('checkpoints_removed', 'Checkpoints Removed'), ('restored', 'Restored')], max_length=32),
        ),
        migrations.RunPython(forwards, backwards),
    ]
