"""SIGINT, SIGTERM and SIGHUP end a run through one path: ``Interrupted`` in the main thread.

``ftlab.cli.app`` records an interrupted run (``status: interrupted``, the last checkpoint,
the resume command) and exits without a traceback. The handlers must be (re)installed
after Paddle and PaddleNLP are imported: their imports replace the process's SIGTERM
handler at the C level (glog's failure-signal handler dumps a C++ report and dies; a
later import resets it to the default), behind Python's back, so that a SIGTERM would
kill the run without a record. ``install`` is called when the ``ftlab`` command starts,
once a run has validated (Paddle imported), and just before training starts.
"""

from __future__ import annotations

import signal
from typing import Any

from ftlab.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Make every stop signal raise ``Interrupted`` (main thread only, as Python requires)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)


def ignore() -> None:
    """While an interruption is being recorded: a second signal must not cut it short."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
