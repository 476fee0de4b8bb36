"""Lets the example's tests run from a checkout: taskrt's source (python/src) is used when the
package is not installed."""

import importlib.util
import sys
from pathlib import Path

try:
    import taskrt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))


def pytest_addoption(parser):
    if importlib.util.find_spec("pytest_asyncio") is None:
        parser.addini("asyncio_default_fixture_loop_scope", "pytest-asyncio's (unused here)")
