"""Issue 24: an event no longer stores ``prev_hash``, the ``hash`` of the event before
it in its task, which the chain's verification now reads from that event itself
(``audit.integrity.chain_verify``); its hash is over the same bytes as before.

Forwards, on PostgreSQL, the column is dropped only where every event's ``prev_hash``
is its predecessor's ``hash`` (so nothing is lost); otherwise the trail was tampered
with and the migration stops, naming the first such events: run ``manage.py
audit_verify --all`` and keep its report first (RUNBOOK.md, "Audit chain"), then set
``AGENTS_AUDIT_DROP_PREV_HASH=force`` to go on (the breaks stay visible:
``audit_verify`` reports each such event as changed). Backwards, the column is
filled again from the predecessors' hashes, with the append-only trigger disabled for
that one UPDATE.
"""

import os

from django.db import migrations

UNMATCHED = """
SELECT task_id, seq FROM (
    SELECT task_id, seq, prev_hash,
           lag(hash) OVER (PARTITION BY task_id ORDER BY seq, id) AS before
      FROM audit_auditevent
) e
WHERE prev_hash IS DISTINCT FROM before
ORDER BY task_id, seq
LIMIT 10
"""
FILL = """
ALTER TABLE audit_auditevent DISABLE TRIGGER audit_event_append_only;
UPDATE audit_auditevent e SET prev_hash = b.before
  FROM (SELECT id, lag(hash) OVER (PARTITION BY task_id ORDER BY seq, id) AS before
          FROM audit_auditevent) b
 WHERE b.id = e.id AND b.before IS NOT NULL;
ALTER TABLE audit_auditevent ENABLE TRIGGER audit_event_append_only;
"""


def check(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(UNMATCHED)
        unmatched = cursor.fetchall()
    if unmatched and os.environ.get("AGENTS_AUDIT_DROP_PREV_HASH") != "force":
        where = ", ".join(f"task {task} event #{seq}" for task, seq in unmatched)
        raise RuntimeError(
            f"audit events whose prev_hash is not the hash of the event before them: {where}."
            " The trail was changed: keep the report of `manage.py audit_verify --all`, then"
            " run the migration with AGENTS_AUDIT_DROP_PREV_HASH=force (RUNBOOK.md)."
        )


def fill(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FILL)


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0009_growth_digest_bytes"),
    ]

    operations = [
        migrations.RunPython(check, fill),
        migrations.RemoveField(model_name="auditevent", name="prev_hash"),
    ]
