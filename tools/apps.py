from importlib import import_module

from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "tools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        import_module("tools.builtin")
        import_module("tools.mcp")  # the mcp: namespace of the registry
        import_module("tools.checks")
