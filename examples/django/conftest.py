"""Makes the example's tests run from a checkout as well as with taskrt pip-installed: the
package's source (python/src) is used when taskrt is not installed, and its pytest plugin
(the `taskrt_eager` fixture) is loaded when its entry point is not."""

import importlib.util
import sys
from pathlib import Path

try:
    import taskrt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("taskrt"):
        config.pluginmanager.import_plugin("taskrt.pytest_plugin")


def pytest_addoption(parser):
    if importlib.util.find_spec("pytest_asyncio") is None:
        parser.addini("asyncio_default_fixture_loop_scope", "pytest-asyncio's (unused here)")
