from importlib import import_module

from django.apps import AppConfig


class LlmConfig(AppConfig):
    name = "llm"
    verbose_name = "LLM agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The built-in ``llm`` agent registers itself on import, like ``scripted``; the
        # metrics are created at import so a scrape lists them before the first call.
        import_module("llm.metrics")
        import_module("llm.agent")
        # ``GET /api/tasks/{id}/``'s usage is this app's model calls.
        from agents.selectors import task_usage_reader_register
        from llm.selectors import task_usage

        task_usage_reader_register(task_usage)
        # The event stream relays model deltas live (token streaming).
        from agents.events import live_source_register
        from llm.streaming import DeltaSubscription

        live_source_register(DeltaSubscription)
