"""How Paddle computes on a CPU: MKL's code path, the math threads per process, and
the eager layers' layout (together ``launch.cpu_fast_path`` / ``launch.cpu_threads``).

Three defaults of the CPU build cost ftlab's users time, and PaddleNLP changes none:
- Paddle's bundled MKL picks its kernels by CPU vendor and takes a generic code path on
  AMD processors; ``MKL_DEBUG_CPU_TYPE=5`` makes it use its AVX2 kernels (measured on the
  project's AMD EPYC: a 1024^3 fp32 matmul 33-35 -> 74-80 GFLOP per CPU second). The
  variable is read when MKL initialises, so it must be in the environment before Paddle is
  imported; worker processes inherit it from the launching process.
- ``paddle.base`` sets ``OMP_NUM_THREADS=1`` when it is unset, so every process does its
  math on one thread however many cores it has. ``launch.cpu_threads=auto`` gives each
  process the cores it can use divided by the processes per node (``dp2`` on 2 cores: 1
  each); the count is set with ``paddle.base.core.set_num_threads`` once Paddle is loaded
  (setting ``OMP_NUM_THREADS`` instead makes Paddle print a warning on every start).
- PaddleNLP's eager layers are written for GPUs, where they are fused kernels; on CPU
  they hit Paddle's slowest kernels: attention adds the mask over the head axis of the
  scores and casts around the softmax (about a third slower per layer than the same
  function laid out heads first, ``ftlab.models.attention``), RMSNorm squares with the
  generic ``pow`` and the rotary embedding slices and concatenates the head dimension
  (``ftlab.models.cpu_layers``: 7.5 -> 1.0 ms per norm, 15 -> 1.6 ms per layer's
  rotary). The fast path computes the same functions with the fast kernels.

This module imports no Paddle: the decision is made before Paddle loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ftlab.errors import ConfigError

MKL_VAR = "MKL_DEBUG_CPU_TYPE"
MKL_AVX2 = "5"
# Set beside MKL_VAR when ftlab chose it, so worker processes (which inherit both) record
# who decided, and a user's own value is never mistaken for ftlab's.
SET_BY_FTLAB_VAR = "FTLAB_MKL_SET_BY_FTLAB"


# Eager attention, RMSNorm and rotary embedding on CPU, by launch.cpu_fast_path: ftlab's
# layouts of the same functions (ftlab/models/attention.py::_eager_as_attend,
# ftlab/models/cpu_layers.py) or PaddleNLP's own.
CPU_LAYERS = {
    True: "ftlab's CPU layouts (attention heads first, RMSNorm, rotary)",
    False: "PaddleNLP's eager",
}


@dataclass(frozen=True)
class CpuInfo:
    vendor: str  # /proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD, ...
    flags: frozenset[str]


def read_cpu_info(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The first processor's vendor and flags (empty where /proc/cpuinfo is unreadable)."""
    vendor, flags = "", frozenset[str]()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return CpuInfo(vendor, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if vendor and flags:
            break
    return CpuInfo(vendor, flags)


@dataclass(frozen=True)
class MklPath:
    """What ftlab decided about MKL's code path, as recorded in ``environment.json``."""

    value: str | None  # MKL_DEBUG_CPU_TYPE as the process runs with it
    reason: str

    def describe(self) -> str:
        if self.value is None:
            return f"MKL default path ({self.reason})"
        return f"{MKL_VAR}={self.value} ({self.reason})"


def choose_mkl_path(enabled: bool, environ: MutableMapping[str, str], cpu: CpuInfo) -> MklPath:
    """Set ``MKL_DEBUG_CPU_TYPE=5`` in ``environ`` on an AMD CPU with AVX2 unless the user
    set the variable or ``launch.cpu_fast_path=false``; say why either way."""
    if MKL_VAR in environ:
        if environ.get(SET_BY_FTLAB_VAR) == environ[MKL_VAR]:
            return MklPath(environ[MKL_VAR], "set by ftlab: AMD CPU with AVX2")
        return MklPath(environ[MKL_VAR], "set in the environment by the user")
    if not enabled:
        return MklPath(None, "launch.cpu_fast_path=false")
    if cpu.vendor != "AuthenticAMD":
        return MklPath(None, f"{cpu.vendor or 'unknown'} CPU: MKL already picks its kernels")
    if "avx2" not in cpu.flags:
        return MklPath(None, "AMD CPU without AVX2")
    environ[MKL_VAR] = MKL_AVX2
    environ[SET_BY_FTLAB_VAR] = MKL_AVX2
    reason = "set by ftlab: AMD CPU with AVX2"
    if "paddle" in sys.modules:  # MKL may have initialised already in this process
        reason += "; Paddle was already loaded here, so it applies to processes started from it"
    return MklPath(MKL_AVX2, reason)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_cpu_threads(setting: str, processes_per_node: int, cores: int) -> int:
    """``launch.cpu_threads``: ``auto`` -> the cores divided among the node's processes
    (at least 1); a positive whole number -> itself."""
    text = str(setting).strip().lower()
    if text == "auto":
        return max(1, cores // max(1, processes_per_node))
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1 or str(threads) != text:
        raise ConfigError(
            f"launch.cpu_threads={setting!r}: give 'auto' (the cores divided among the "
            "processes on a node) or a whole number of math threads per process >= 1"
        )
    return threads


def apply_cpu_threads(threads: int) -> None:
    """Set Paddle's CPU math threads for this process (Paddle must be importable)."""
    from paddle.base import core

    core.set_num_threads(threads)


def use_fast_mkl_path() -> MklPath:
    """For commands without a run config (``ftlab-predict``, ``ftlab-merge``): MKL's AVX2
    kernels where they apply, unless the environment says otherwise. Call before Paddle
    is imported."""
    return choose_mkl_path(True, os.environ, read_cpu_info())
