"""``python -m taskrt.worker`` (see :mod:`taskrt.worker`)."""

from taskrt.worker import _exit_now, main

# os._exit: threads a task module started never keep a finished worker alive.
_exit_now(main())
