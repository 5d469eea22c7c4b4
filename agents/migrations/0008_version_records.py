"""The version-rollout records (``WorkerVersion``, ``VersionHold``) belong to the core
now (``agents.core.versions`` writes and reads them): their state moves from the rollout
app to this one. The tables stay as ``rollout.0001`` made them; nothing is written."""

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("agents", "0007_hot_updates"),
        ("rollout", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="VersionHold",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("agent", models.CharField(max_length=200)),
                        ("version", models.CharField(max_length=50)),
                        ("reason", models.TextField(blank=True, default="")),
                        ("created_by", models.CharField(blank=True, default="", max_length=200)),
                        ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                    ],
                    options={
                        "db_table": "rollout_versionhold",
                        "constraints": [models.UniqueConstraint(fields=("agent", "version"), name="version_hold_once")],
                    },
                ),
                migrations.CreateModel(
                    name="WorkerVersion",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("worker", models.CharField(max_length=300)),
                        ("agent", models.CharField(max_length=200)),
                        ("version", models.CharField(max_length=50)),
                        ("state_version", models.PositiveIntegerField(default=1)),
                        ("compatible", models.JSONField(default=list)),
                        ("started_at", models.DateTimeField(default=django.utils.timezone.now)),
                        ("last_seen", models.DateTimeField(default=django.utils.timezone.now)),
                    ],
                    options={
                        "db_table": "rollout_workerversion",
                        "indexes": [models.Index(fields=["agent", "last_seen"], name="worker_version_live")],
                        "constraints": [models.UniqueConstraint(fields=("worker", "agent"), name="worker_version_once")],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
