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
        return Environment("gpu", paddle.device.cuda.device_count(), paddle.__version__, cap)
    return Environment("cpu", os.cpu_count() or 1, paddle.__version__)
