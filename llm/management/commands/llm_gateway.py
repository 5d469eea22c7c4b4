"""``manage.py llm_gateway``: run the model gateway (``llm.gateway``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from llm.gateway import gateway_run


class Command(BaseCommand):
    help = (
        "Run the model gateway: make the model calls that llm steps hand off "
        "(AGENTS_LLM_GATEWAY), thousands at once, in one asyncio process. SIGTERM drains."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.CELERY_BROKER_URL.startswith(("amqp://", "amqps://")):
            raise CommandError(
                "the model gateway needs RabbitMQ: CELERY_BROKER_URL must be amqp:// or amqps://"
            )
        gateway_run()
