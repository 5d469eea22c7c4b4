"""Audit events in monthly partitions (PostgreSQL declarative partitioning, issue 24).

``audit_auditevent`` becomes a table partitioned by RANGE on ``created_at`` (UTC
months, ``audit_auditevent_pYYYY_MM``) with a DEFAULT partition
(``audit_auditevent_default``) so that an insert never fails for want of a partition.
The existing table is moved in this migration: the partitioned table is created beside
it (same columns, in the same order, ids kept, the identity continued), a partition is
made for every month from its oldest event to three months ahead, the rows are copied,
the old table dropped and the new one renamed. It holds an ACCESS EXCLUSIVE lock on the
trail for the copy: run it in a maintenance window on a large database (RUNBOOK.md).

Keys. PostgreSQL requires every unique constraint of a partitioned table to include the
partition key, so the primary key is ``(id, created_at)`` (Django still knows ``id`` as
the primary key; ids come from one identity sequence and stay unique) and
``audit_event_seq_per_task`` is ``UNIQUE (task_id, seq, created_at)``. One event per
``(task, seq)`` is kept by what already serialises appends: every writer holds the
task's row lock or its fenced UPDATE on ``audit_seq`` (``audit.services.AuditBatch``,
``agents.core.commit``), so two writers never number an event alike; the constraint
still refuses a duplicate written at the same instant, and ``audit_verify`` reports any
other duplicate as ``inserted`` (a second event with one number). A non-partitioned
side index on ``(task_id, seq)`` would enforce it in the database, at the price of a
second index entry per event (~50 bytes) on the hot path: not taken.

The foreign key from events to ``agents_agenttask`` is not recreated
(``db_constraint=False``): retention leaves a removed task's events in a closed month
partition until the whole partition is dropped (``audit.partitions``), so they outlive
the task's row for a while. In its place: ``agent_task_delete_guard`` (agents.0014)
now also refuses to delete a task that has audit events and no ``TaskRemoval`` record,
and events are only written by code that holds the task's row.

Functions (SECURITY DEFINER: they run as the tables' owner, so the app role, which may
only SELECT and INSERT on the trail, can call them; each checks what it may do):

- ``audit_partition_create(month)``: the month's partition, if missing; rows of that
  month already in the DEFAULT partition are moved into it.
- ``audit_partition_drop(name, actor)``: detaches and drops a month partition that has
  ended, when no event in it belongs to a task still in the database and every task
  with events in it has a ``TaskRemoval`` record; writes an ``AuditPartitionRemoval``
  record (append-only) in the same transaction.
- ``audit_events_remove(task, everywhere)``: as in audit.0007, but by default deletes
  only the events in the DEFAULT partition and in months not yet ended; events in
  ended months are left for their partition's drop. It returns the events deleted plus
  those left. ``everywhere`` deletes them all (the row-delete fallback).

The append-only trigger is defined on the partitioned table, so PostgreSQL clones it
onto every partition (present and future): UPDATE and DELETE stay refused through the
parent and on a partition directly. ``audit.moving`` marks the DEFAULT partition's rows
being moved by ``audit_partition_create``.

On SQLite (the demo) the table stays as it was.
"""

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

MOVE = """
LOCK TABLE audit_auditevent IN ACCESS EXCLUSIVE MODE;
CREATE TABLE audit_auditevent_partitioned (
    LIKE audit_auditevent INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS
        INCLUDING STORAGE INCLUDING COMPRESSION
) PARTITION BY RANGE (created_at);
ALTER TABLE audit_auditevent_partitioned
    ADD CONSTRAINT audit_auditevent_partitioned_pkey PRIMARY KEY (id, created_at),
    ADD CONSTRAINT audit_event_seq_per_task_partitioned UNIQUE (task_id, seq, created_at);
CREATE TABLE audit_auditevent_default PARTITION OF audit_auditevent_partitioned DEFAULT;
DO $$
DECLARE
    month timestamp := date_trunc(
        'month', coalesce((SELECT min(created_at) FROM audit_auditevent), now()) AT TIME ZONE 'UTC'
    );
    last timestamp := date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months';
BEGIN
    WHILE month <= last LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF audit_auditevent_partitioned FOR VALUES FROM (%L) TO (%L)',
            'audit_auditevent_p' || to_char(month, 'YYYY_MM'),
            month AT TIME ZONE 'UTC',
            (month + interval '1 month') AT TIME ZONE 'UTC'
        );
        month := month + interval '1 month';
    END LOOP;
END;
$$;
INSERT INTO audit_auditevent_partitioned SELECT * FROM audit_auditevent;
SELECT setval(
    pg_get_serial_sequence('audit_auditevent_partitioned', 'id'),
    greatest((SELECT max(id) FROM audit_auditevent_partitioned), 1),
    (SELECT max(id) IS NOT NULL FROM audit_auditevent_partitioned)
);
DROP TABLE audit_auditevent;
ALTER TABLE audit_auditevent_partitioned RENAME TO audit_auditevent;
ALTER TABLE audit_auditevent RENAME CONSTRAINT audit_auditevent_partitioned_pkey
    TO audit_auditevent_pkey;
ALTER TABLE audit_auditevent RENAME CONSTRAINT audit_event_seq_per_task_partitioned
    TO audit_event_seq_per_task;
ALTER SEQUENCE audit_auditevent_partitioned_id_seq RENAME TO audit_auditevent_id_seq;
CREATE INDEX audit_event_task_errors ON audit_auditevent (task_id, seq DESC)
    WHERE type IN ('step_failed', 'dead_lettered', 'schema_refused', 'worker_lost');
REVOKE TRUNCATE ON audit_auditevent FROM PUBLIC, CURRENT_USER;

CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND OLD.task_id::text = coalesce(current_setting('audit.removing', true), '') THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'DELETE' AND coalesce(current_setting('audit.moving', true), '') = 'on'
       AND TG_TABLE_NAME = 'audit_auditevent_default' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit events are append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_event_append_only
    BEFORE UPDATE OR DELETE ON audit_auditevent
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();

CREATE OR REPLACE FUNCTION audit_partition_create(p_month timestamptz) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    month timestamp := date_trunc('month', p_month AT TIME ZONE 'UTC');
    lo timestamptz := month AT TIME ZONE 'UTC';
    hi timestamptz := (month + interval '1 month') AT TIME ZONE 'UTC';
    name text := 'audit_auditevent_p' || to_char(month, 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_auditevent_default WHERE created_at >= lo AND created_at < hi)
    THEN
        -- A partition cannot be made over rows of the DEFAULT one: move them into it.
        CREATE TEMP TABLE audit_moving AS
            SELECT * FROM audit_auditevent_default WHERE created_at >= lo AND created_at < hi;
        PERFORM set_config('audit.moving', 'on', true);
        DELETE FROM audit_auditevent_default WHERE created_at >= lo AND created_at < hi;
        PERFORM set_config('audit.moving', '', true);
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF audit_auditevent FOR VALUES FROM (%L) TO (%L)',
            name, lo, hi
        );
        INSERT INTO audit_auditevent SELECT * FROM audit_moving;
        DROP TABLE audit_moving;
    ELSE
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF audit_auditevent FOR VALUES FROM (%L) TO (%L)',
            name, lo, hi
        );
    END IF;
    RETURN name;
END;
$$;

CREATE OR REPLACE FUNCTION audit_partition_drop(p_name text, p_actor text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    month timestamp;
    hi timestamptz;
    events bigint;
    tasks bigint;
    present bigint;
    unrecorded bigint;
BEGIN
    IF p_name !~ '^audit_auditevent_p[0-9]{4}_[0-9]{2}$' OR NOT EXISTS (
        SELECT 1 FROM pg_inherits
         WHERE inhparent = 'audit_auditevent'::regclass AND inhrelid = to_regclass(p_name)
    ) THEN
        RAISE EXCEPTION '% is not a month partition of audit_auditevent', p_name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    month := to_date(right(p_name, 7), 'YYYY_MM')::timestamp;
    hi := (month + interval '1 month') AT TIME ZONE 'UTC';
    IF hi > now() - interval '1 hour' THEN
        RAISE EXCEPTION 'partition % has not ended an hour ago (it ends at %)', p_name, hi
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Nobody inserts into it (a restore would) while it is checked and dropped.
    EXECUTE format('LOCK TABLE %I IN SHARE MODE', p_name);
    EXECUTE format(
        'SELECT count(*), count(DISTINCT task_id) FROM %I', p_name
    ) INTO events, tasks;
    EXECUTE format(
        'SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM agents_agenttask AS t'
        '                                      WHERE t.id = d.task_id)),'
        '       count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM audit_taskremoval AS r'
        '                                          WHERE r.task_id = d.task_id))'
        '  FROM (SELECT DISTINCT task_id FROM %I) AS d',
        p_name
    ) INTO present, unrecorded;
    IF present > 0 THEN
        RAISE EXCEPTION 'partition % holds events of % task(s) still in the database',
            p_name, present USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF unrecorded > 0 THEN
        RAISE EXCEPTION 'partition % holds events of % task(s) with no removal record',
            p_name, unrecorded USING ERRCODE = 'insufficient_privilege';
    END IF;
    EXECUTE format('ALTER TABLE audit_auditevent DETACH PARTITION %I', p_name);
    EXECUTE format('DROP TABLE %I', p_name);
    INSERT INTO audit_auditpartitionremoval
        (name, range_start, range_end, events, tasks, actor, created_at)
        VALUES (p_name, month AT TIME ZONE 'UTC', hi, events, tasks, p_actor, now());
    RETURN events;
END;
$$;

DROP FUNCTION IF EXISTS audit_events_remove(uuid);
CREATE OR REPLACE FUNCTION audit_events_remove(p_task uuid, p_everywhere boolean DEFAULT false)
    RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    removed bigint;
    left_ bigint;
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
    IF p_everywhere THEN
        DELETE FROM audit_auditevent WHERE task_id = p_task;
        GET DIAGNOSTICS removed = ROW_COUNT;
        left_ := 0;
    ELSE
        -- Months not yet ended may still be written to: delete there (and in DEFAULT);
        -- an ended month's events go with its partition (audit_partition_drop).
        DELETE FROM audit_auditevent
         WHERE task_id = p_task
           AND created_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        GET DIAGNOSTICS removed = ROW_COUNT;
        DELETE FROM audit_auditevent_default WHERE task_id = p_task;
        GET DIAGNOSTICS left_ = ROW_COUNT;
        removed := removed + left_;
        SELECT count(*) INTO left_ FROM audit_auditevent WHERE task_id = p_task;
    END IF;
    PERFORM set_config('audit.removing', '', true);
    RETURN removed + left_;
END;
$$;

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
    -- In place of the events' foreign key (audit.0011): a task with a trail leaves only
    -- through retention, which records the removal first.
    IF EXISTS (SELECT 1 FROM audit_auditevent WHERE task_id = OLD.id)
       AND NOT EXISTS (SELECT 1 FROM audit_taskremoval WHERE task_id = OLD.id) THEN
        RAISE EXCEPTION 'task % has audit events and no removal record', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END;
$$ LANGUAGE plpgsql;
"""

RECORD_APPEND_ONLY = """
CREATE TRIGGER audit_auditpartitionremoval_append_only
    BEFORE UPDATE OR DELETE ON audit_auditpartitionremoval
    FOR EACH ROW EXECUTE FUNCTION audit_record_append_only();
REVOKE TRUNCATE ON audit_auditpartitionremoval FROM PUBLIC, CURRENT_USER;
"""


BACK = """
LOCK TABLE audit_auditevent IN ACCESS EXCLUSIVE MODE;
CREATE TABLE audit_auditevent_plain (
    LIKE audit_auditevent INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS
        INCLUDING STORAGE INCLUDING COMPRESSION
);
INSERT INTO audit_auditevent_plain SELECT * FROM audit_auditevent;
SELECT setval(
    pg_get_serial_sequence('audit_auditevent_plain', 'id'),
    greatest((SELECT max(id) FROM audit_auditevent_plain), 1),
    (SELECT max(id) IS NOT NULL FROM audit_auditevent_plain)
);
DROP TABLE audit_auditevent;
DROP FUNCTION IF EXISTS audit_partition_create(timestamptz);
DROP FUNCTION IF EXISTS audit_partition_drop(text, text);
ALTER TABLE audit_auditevent_plain RENAME TO audit_auditevent;
ALTER SEQUENCE audit_auditevent_plain_id_seq RENAME TO audit_auditevent_id_seq;
ALTER TABLE audit_auditevent
    ADD CONSTRAINT audit_auditevent_pkey PRIMARY KEY (id),
    ADD CONSTRAINT audit_event_seq_per_task UNIQUE (task_id, seq),
    ADD CONSTRAINT audit_auditevent_task_id_fk_agents_agenttask_id FOREIGN KEY (task_id)
        REFERENCES agents_agenttask (id) DEFERRABLE INITIALLY DEFERRED;
CREATE INDEX audit_event_task_errors ON audit_auditevent (task_id, seq DESC)
    WHERE type IN ('step_failed', 'dead_lettered', 'schema_refused', 'worker_lost');
REVOKE TRUNCATE ON audit_auditevent FROM PUBLIC, CURRENT_USER;
CREATE TRIGGER audit_event_append_only
    BEFORE UPDATE OR DELETE ON audit_auditevent
    FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
DROP FUNCTION IF EXISTS audit_events_remove(uuid, boolean);
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
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(MOVE, params=None)
        schema_editor.execute(RECORD_APPEND_ONLY, params=None)


def backwards(apps, schema_editor):
    """Back to one plain table (its foreign key too: refused while events of removed
    tasks wait for their partition's drop)."""
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACK, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0015_growth_flat_pages"),
        ("audit", "0010_verify_drop_prev_hash"),
    ]

    operations = [
        migrations.CreateModel(
            name="AuditPartitionRemoval",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=63)),
                ("range_start", models.DateTimeField()),
                ("range_end", models.DateTimeField()),
                ("events", models.PositiveBigIntegerField()),
                ("tasks", models.PositiveBigIntegerField()),
                ("actor", models.CharField(max_length=200)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={"ordering": ["range_start", "id"]},
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AlterField(
                    model_name="auditevent",
                    name="task",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="audit_events",
                        to="agents.agenttask",
                    ),
                ),
                migrations.RemoveConstraint(
                    model_name="auditevent", name="audit_event_seq_per_task"
                ),
                migrations.AddConstraint(
                    model_name="auditevent",
                    constraint=models.UniqueConstraint(
                        fields=("task", "seq", "created_at"), name="audit_event_seq_per_task"
                    ),
                ),
            ],
        ),
    ]
