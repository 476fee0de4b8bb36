from __future__ import annotations

from typing import Iterator

import pytest

from taskrt import _task as task_module


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with taskrt unconfigured and no TASKRT_* variable."""
    for name in ("TASKRT_URL", "TASKRT_TOKEN", "TASKRT_EAGER"):
        monkeypatch.delenv(name, raising=False)
    saved = task_module._settings
    task_module._settings = task_module._Settings()
    try:
        yield
    finally:
        if task_module._settings.own_client and task_module._settings.client is not None:
            task_module._settings.client.close()
        task_module._settings = saved
