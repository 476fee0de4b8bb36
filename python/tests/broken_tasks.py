"""A module whose import fails (the worker reports `fatal`)."""

raise RuntimeError("settings are broken")
