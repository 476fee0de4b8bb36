"""Lets the example's tests run from a checkout: taskrt's source (python/src) is used when the
package is not installed."""

import sys
from pathlib import Path

try:
    import taskrt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))
