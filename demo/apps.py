from django.apps import AppConfig


class DemoConfig(AppConfig):
    """``manage.py demo``: the zero-setup showcase, on top of every other app."""

    name = "demo"
