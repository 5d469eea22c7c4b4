"""``WorkerVersion`` and ``VersionHold`` moved to the agents app (``agents.0008``), which
keeps their tables; this app keeps the ``versions`` command and its report."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("rollout", "0001_initial"),
        ("agents", "0008_version_records"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="VersionHold"),
                migrations.DeleteModel(name="WorkerVersion"),
            ],
            database_operations=[],
        ),
    ]
