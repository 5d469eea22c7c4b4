# Records where the hash chain begins: events already without a hash now are the ones
# written before the chain existed (migration 0003); any later event without one had
# its hash removed, which audit_verify reports as a break ("unsealed").

import django.utils.timezone
from django.db import migrations, models


def record(apps, schema_editor):
    AuditEvent = apps.get_model("audit", "AuditEvent")
    AuditChainStart = apps.get_model("audit", "AuditChainStart")
    last = (
        AuditEvent.objects.filter(hash="").order_by("-id").values_list("id", flat=True).first()
    )
    AuditChainStart.objects.create(unchained_through_id=last or 0)


class Migration(migrations.Migration):

    dependencies = [
        ("audit", "0004_model_call_event"),
    ]

    operations = [
        migrations.CreateModel(
            name="AuditChainStart",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("unchained_through_id", models.BigIntegerField(default=0)),
                ("recorded_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
        ),
        migrations.RunPython(record, migrations.RunPython.noop),
    ]
