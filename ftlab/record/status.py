"""The outcome of one run: ``status.json``, plus ``error.txt`` when it failed.

``summary.json`` exists only when training finished, so on its own it cannot tell a run
that failed from one that is still going or was killed. ``status.json`` says:

* ``running`` from the moment training really starts (with the process id and host, and
  the id of the attempt, so that a resume that fails before it starts can tell that the
  record is not its own);
* ``completed``, ``failed`` (the error's type and message, its traceback in ``error.txt``)
  or ``interrupted`` (the signal, the last checkpoint and the command that resumes) when
  the ``ftlab`` process ends.

A run dir without the file, or whose ``running`` process is gone, is incomplete: killed,
or stopped before ftlab could record anything.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
from datetime import datetime
from typing import Any

from ftlab.record.rundir import ERROR, STATUS, RunDir, is_disk_full

log = logging.getLogger(__name__)

COMPLETED = "completed"
FAILED = "failed"
INTERRUPTED = "interrupted"
RUNNING = "running"
INCOMPLETE = "incomplete"
# Set by the ``ftlab`` process of a job and inherited by its workers: one id per attempt.
ATTEMPT_ENV = "FTLAB_ATTEMPT"


def iso_time(epoch: float) -> str:
    """Local time with its UTC offset, to the second (how runs are listed and sorted)."""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def current_attempt() -> str | None:
    return os.environ.get(ATTEMPT_ENV)


def mark_running(run_dir: RunDir, context: dict[str, Any] | None = None) -> None:
    """``status.json`` = running: this attempt's training has really started."""
    run_dir.write_json(
        STATUS,
        {
            "status": RUNNING,
            "started_at": iso_time(time.time()),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "attempt": current_attempt(),
            **(context or {}),
        },
    )


def is_running(status: dict[str, Any]) -> bool:
    """A ``running`` record whose process is alive (on another host: taken at its word)."""
    if status.get("status") != RUNNING:
        return False
    if status.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(status.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def started_by_this_attempt(run_dir: RunDir) -> bool:
    """Whether the run's ``status.json`` was written by this attempt (see ``mark_running``)."""
    status = run_dir.read_json(STATUS)
    return current_attempt() is not None and status.get("attempt") == current_attempt()


def record_status(
    run_dir: RunDir,
    started: float,
    error: BaseException | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``status.json`` (and ``error.txt`` for a failure); return what was written.

    ``started`` is the ``time.time()`` at which the run began; ``context`` adds fields
    such as the mode, the job number, the overrides of a sweep job, the last checkpoint
    of an interrupted run. ``status.json`` is written first and ``error.txt`` after it, so
    that on a full disk the small record still has the best chance; a write that fails
    for lack of space is logged, never raised over the error being recorded.
    """
    finished = time.time()
    interrupted = isinstance(error, KeyboardInterrupt)
    status: dict[str, Any] = {
        "status": INTERRUPTED if interrupted else (FAILED if error is not None else COMPLETED),
        "started_at": iso_time(started),
        "finished_at": iso_time(finished),
        "wall_seconds": round(finished - started, 2),
        **(context or {}),
    }
    if interrupted:
        status["signal"] = signal.Signals(getattr(error, "signum", signal.SIGINT)).name
    elif error is not None:
        status.update(error_type=type(error).__name__, error=str(error), traceback=ERROR)
    try:
        run_dir.create()
        run_dir.write_json(STATUS, status)
        if error is not None and not interrupted:
            run_dir.write_text(ERROR, "".join(traceback.format_exception(error)))
    except OSError as err:
        if not is_disk_full(err):
            raise
        log.error("could not record the run's status in %s: %s", run_dir, err)
    return status
