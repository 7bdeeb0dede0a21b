"""Where a process's time goes: wall and CPU time at the end of each phase.

``mark(name)`` closes the phase ``name`` (it ran since the previous mark); the run marks
composition, data, model load, base evaluation, training, tuned evaluation and saving,
and at its end logs each phase's wall and CPU seconds to ``train.log``. ``bench/startup.py`` reads
the marks of the process it runs, so the benchmark and the log split time the same way.

CPU time (``time.process_time``: every thread of this process) is reported beside wall
time because on a shared machine wall time measures the neighbours as much as the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mark:
    name: str  # the phase that ended here
    wall: float  # time.time()
    cpu: float  # time.process_time()


MARKS: list[Mark] = []


def mark(name: str) -> Mark:
    """End the phase ``name`` now."""
    now = Mark(name, time.time(), time.process_time())
    MARKS.append(now)
    return now


def log_since(name: str) -> None:
    """Log each phase after the last mark ``name`` (all marks when there is none)."""
    starts = [i for i, m in enumerate(MARKS) if m.name == name]
    for phase, (wall, cpu) in durations(MARKS[starts[-1] if starts else 0 :]).items():
        log.info("phase %s: %.2f s wall, %.2f s CPU", phase, wall, cpu)


def durations(marks: list[Mark]) -> dict[str, tuple[float, float]]:
    """``{phase: (wall s, CPU s)}`` between consecutive marks (a repeated phase adds up)."""
    out: dict[str, tuple[float, float]] = {}
    for before, now in zip(marks, marks[1:], strict=False):
        wall, cpu = out.get(now.name, (0.0, 0.0))
        out[now.name] = (wall + now.wall - before.wall, cpu + now.cpu - before.cpu)
    return out
