from importlib import import_module

from django.apps import AppConfig
from django.conf import settings


class AgentsConfig(AppConfig):
    name = "agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Agents register themselves on import: the built-in one, then the project's.
        import_module("agents.scripted")
        for module in settings.AGENTS["MODULES"]:
            import_module(module)
        import_module("agents.checks")
        # Registers the check of a parent's join on every task's ending.
        import_module("agents.core.children")
