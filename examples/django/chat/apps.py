from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """The node `.delay()` and `taskrt.handle(id)` talk to, from the settings (in the
        runtime's workers too, for tasks that enqueue tasks)."""
        from django.conf import settings

        import taskrt

        taskrt.configure(url=settings.TASKRT_URL, token=settings.TASKRT_TOKEN, timeout=5.0)
