"""The sweep's marker (``AgentTask.swept_fence``): the lease it last published a step
again for, so a vanished holder's step is published once per lease, never in a loop."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("agents", "0008_version_records"),
    ]

    operations = [
        migrations.AddField(
            model_name="agenttask",
            name="swept_fence",
            field=models.PositiveBigIntegerField(blank=True, null=True),
        ),
    ]
