from django.apps import AppConfig


class RolloutConfig(AppConfig):
    name = "rollout"
    verbose_name = "Agent versions and rollout"
    default_auto_field = "django.db.models.BigAutoField"
