"""The outcome of one run: ``status.json``, plus ``error.txt`` when it failed.

``summary.json`` exists only when training finished, so on its own it cannot tell a run
that failed from one that is still going or was killed. ``status.json`` is written by the
``ftlab`` process when the run ends either way: ``completed`` or ``failed`` (with the
error's type and message, and its traceback in ``error.txt``). A run dir with neither
file is incomplete: running, killed, or stopped before ftlab could record anything.
"""

from __future__ import annotations

import time
import traceback
from datetime import datetime
from typing import Any

from ftlab.record.rundir import ERROR, STATUS, RunDir

COMPLETED = "completed"
FAILED = "failed"
INCOMPLETE = "incomplete"


def iso_time(epoch: float) -> str:
    """Local time with its UTC offset, to the second (how runs are listed and sorted)."""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def record_status(
    run_dir: RunDir,
    started: float,
    error: BaseException | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``status.json`` (and ``error.txt`` for a failure); return what was written.

    ``started`` is the ``time.time()`` at which the run began; ``context`` adds fields
    such as the mode, the job number and the overrides of a sweep job.
    """
    finished = time.time()
    status: dict[str, Any] = {
        "status": FAILED if error is not None else COMPLETED,
        "started_at": iso_time(started),
        "finished_at": iso_time(finished),
        "wall_seconds": round(finished - started, 2),
        **(context or {}),
    }
    run_dir.create()
    if error is not None:
        run_dir.write_text(ERROR, "".join(traceback.format_exception(error)))
        status.update(error_type=type(error).__name__, error=str(error), traceback=ERROR)
    run_dir.write_json(STATUS, status)
    return status
