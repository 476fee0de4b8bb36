from django.urls import path

from . import views

urlpatterns = [
    path("chat/<str:conversation_id>/messages", views.post_message, name="post_message"),
    path("tasks/<str:task_id>", views.task_status, name="task_status"),
]
