"""How ftlab's console scripts end: everything a normal exit does, minus the teardown.

Why: once Paddle and PaddleNLP are loaded, Python's interpreter finalization (freeing every
module, then Paddle's C++ globals) takes about 1.2 s on two cores after the last ``atexit``
handler has run (measured: a process that imports paddle, paddlenlp and paddlenlp.trainer
spent 1.1-1.3 s from its last handler to its exit, 0.05-0.08 s when ended here; 3 pairs).
That is ~5% of the default run and of every end-to-end test. Nothing of ftlab's is lost by
skipping it: every file ftlab writes is closed where it is written, the ``atexit`` handlers
(logging's flush and close, MLflow's run end, PaddleNLP's) still run, and stdio is flushed.

Only the console scripts end this way (``console_script``); ``main()`` itself returns as before,
so a caller in the same process (the tests, ``bench/startup.py``) keeps its interpreter;
so does a process under a profiler or tracer (its results are written after the script
returns). A run that fails keeps Python's normal exit.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable


def finish(code: int) -> None:
    """End the process with ``code`` after the ``atexit`` handlers and a stdio flush,
    skipping interpreter finalization when Paddle is loaded (where it is slow)."""
    # A profiler or tracer (``python -m cProfile``, coverage) writes its results after the
    # script returns: the normal exit keeps them.
    if "paddle" not in sys.modules or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # the handlers a normal exit runs, in the same (LIFO) order
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to lose
            pass
    os._exit(code)


def console_script(entry: Callable[[], int | None]) -> Callable[[], None]:
    """The console-script form of ``entry``: its return value is the exit status."""

    def run() -> None:
        finish(entry() or 0)

    run.__doc__ = entry.__doc__
    return run
