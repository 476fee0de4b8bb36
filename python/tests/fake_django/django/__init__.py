"""A stand-in for Django in the worker tests: records what the worker calls in a file
(``FAKE_DJANGO_LOG``)."""

import os


def record(what: str) -> None:
    with open(os.environ["FAKE_DJANGO_LOG"], "a") as log:
        log.write(what + "\n")


def setup() -> None:
    if os.environ.get("FAKE_DJANGO_FAIL"):
        raise RuntimeError("django.setup() failed: no settings")
    record("setup")
