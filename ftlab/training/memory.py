"""Peak memory of this process: device memory on GPU, resident set on CPU.

PaddleNLP reports no CPU peak memory; ftlab logs this figure at every logging step and
in the summary. Each job of a sweep run in one process resets it, so it reports its own.
"""

from __future__ import annotations

import resource
import sys

from ftlab.config.environment import has_gpu


def peak_memory_mb() -> float:
    """Peak device memory since the last reset: allocated on GPU, resident set on CPU.

    On Linux the CPU figure is ``VmHWM``, which ``reset_peak_memory`` can reset, so each
    job of a sweep run in one process reports its own peak (``ru_maxrss`` cannot be reset).
    """
    if has_gpu():
        import paddle

        return paddle.device.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass  # not Linux: fall through to ru_maxrss
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB else


def reset_peak_memory() -> None:
    """Start a new peak: the current usage becomes the high-water mark."""
    if has_gpu():
        import paddle

        paddle.device.cuda.reset_max_memory_allocated()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM)
    except OSError:
        pass  # not Linux: the peak then spans the whole process, as ru_maxrss does
