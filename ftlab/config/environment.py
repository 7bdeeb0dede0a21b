"""The machine a run computes on: the one device probe every module asks.

``probe_environment`` answers for this machine; ``Environment`` can also be built by hand
to describe another one (a GPU cluster to plan for, an injected environment in tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ftlab.errors import ConfigError


@dataclass(frozen=True)
class Environment:
    """What a machine offers: device kind, how many, Paddle version, GPU generation."""

    device: str  # cpu | gpu
    device_count: int  # GPUs, or CPU cores for gloo processes
    paddle_version: str
    gpu_compute_capability: tuple[int, int] | None = None
    # Memory of one device (GPU), or the machine's RAM (CPU: its processes share it); and
    # the GPU's name (picks parallel=auto's cost profile). None: unknown (a described
    # machine; parallel=auto then takes them from launch.* or the accelerator's profile).
    device_memory_gib: float | None = None
    device_name: str | None = None


def has_gpu() -> bool:
    """True when this process's Paddle is a CUDA build and sees at least one GPU."""
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def probe_environment(requested: str = "auto") -> Environment:
    """This machine, for ``device=auto|cpu|gpu``; ``gpu`` without a visible GPU is refused."""
    import paddle

    gpu = has_gpu()
    if requested == "gpu" and not gpu:
        raise ConfigError(
            "device=gpu: no CUDA device is visible to PaddlePaddle (CPU build, or "
            "CUDA_VISIBLE_DEVICES empty). Use device=cpu or device=auto, or install "
            "paddlepaddle-gpu (see README)."
        )
    if gpu and requested != "cpu":
        cap = paddle.device.cuda.get_device_capability()
        props = paddle.device.cuda.get_device_properties()
        return Environment(
            "gpu",
            paddle.device.cuda.device_count(),
            paddle.__version__,
            cap,
            props.total_memory / GIB,
            props.name,
        )
    return Environment("cpu", os.cpu_count() or 1, paddle.__version__, None, ram_gib())


GIB = 2**30


def ram_gib() -> float | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None
