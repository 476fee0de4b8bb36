from django.db import models


class Message(models.Model):
    """One message of a conversation: the user's (saved by the view) or the assistant's
    (saved by the `process_chat_message` task)."""

    USER = "user"
    ASSISTANT = "assistant"

    conversation_id = models.CharField(max_length=64, db_index=True)
    role = models.CharField(max_length=16, choices=[(USER, USER), (ASSISTANT, ASSISTANT)])
    text = models.TextField()
    #: The task that answered (assistant) or was enqueued for it (user).
    task_id = models.CharField(max_length=256, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.conversation_id} {self.role}: {self.text[:40]}"
