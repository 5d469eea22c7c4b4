"""The task's trace context (``AgentTask.trace_context``): the W3C ``traceparent`` of the
span that created it, which every step of the task joins (``agents_project.tracing``)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("agents", "0009_task_swept_fence"),
    ]

    operations = [
        migrations.AddField(
            model_name="agenttask",
            name="trace_context",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
    ]
