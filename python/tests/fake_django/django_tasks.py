"""Tasks importing Django (the fake one): the worker must have set it up first."""

import django
from django import record

from taskrt import task

record("import django_tasks")


@task(name="dj_task")
def dj_task() -> str:
    record("run dj_task")
    return "ok"
