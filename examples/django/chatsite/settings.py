"""Settings of the example chat site: the smallest Django project that enqueues a task on the
runtime from a view and reads its result back. SQLite only."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# An example: set DJANGO_SECRET_KEY in anything that is not your laptop.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
WSGI_APPLICATION = "chatsite.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("CHAT_DB", str(BASE_DIR / "db.sqlite3")),
        # Connections are closed after each request and, in the runtime's workers, after each
        # task ([workers.NAME] db_close); 0 is Django's default.
        "CONN_MAX_AGE": 0,
    }
}

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The runtime node the views enqueue on and read results from (taskrt.configure in chat/apps.py).
TASKRT_URL = os.environ.get("TASKRT_URL", "http://127.0.0.1:7070")
TASKRT_TOKEN = os.environ.get("TASKRT_TOKEN") or None

# The fake LLM's answer time in seconds (chat/tasks.py); tests set 0.
CHAT_FAKE_LLM_SECONDS = float(os.environ.get("CHAT_FAKE_LLM_SECONDS", "0.5"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
}
