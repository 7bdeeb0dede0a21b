"""The machine a run computes on: the one device probe every module asks.

``probe_environment`` answers for this machine; ``target_environment`` describes the GPU
machine that ``mode=plan`` / ``mode=export`` with ``device=gpu`` prepare a run for (from
the ``target`` settings, probing nothing here), and ``run_environment`` picks between them.
An ``Environment`` can also be built by hand (tests inject one). Every check that depends on
the machine (devices, precision support, PaddleNLP's quantized kernels, flash attention)
reads these fields and never probes the machine itself, so a described machine answers
for the target, and says what it assumed (``assumptions``).
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass

from ftlab.config.schema import RunConfig
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
    # Paddle is a CUDA build (None: assume so exactly when device is gpu).
    cuda_build: bool | None = None
    # PaddleSlim and its CUDA extension import (PaddleNLP's nf4/fp4 quantized kernels).
    paddleslim_ops: bool = False
    # A machine described by the ``target`` settings, not this one: its facts are assumed.
    described: bool = False

    @property
    def is_cuda_build(self) -> bool:
        return self.device == "gpu" if self.cuda_build is None else self.cuda_build

    def assumptions(self) -> list[str]:
        """The facts of a described machine, one line each (empty for a probed one)."""
        if not self.described:
            return []
        cap = ".".join(map(str, self.gpu_compute_capability or ()))
        return [
            f"target GPU machine (described, not probed): {self.device_count} GPU(s) per node "
            f"of compute capability {cap} (target.gpus_per_node, target.compute_capability), "
            f"PaddlePaddle {self.paddle_version} CUDA build"
        ]


NO_GPU = (
    "device=gpu: no CUDA device is visible to PaddlePaddle (CPU build, or "
    "CUDA_VISIBLE_DEVICES empty). Use device=cpu or device=auto, or install "
    "paddlepaddle-gpu (see docs/getting-started.md). To prepare a GPU run on this machine, use "
    "mode=plan or mode=export with device=gpu."
)


def has_gpu() -> bool:
    """True when this process's Paddle is a CUDA build and sees at least one GPU."""
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def paddleslim_ops_importable() -> bool:
    """PaddleSlim and its CUDA extension (``paddleslim_ops``) import in this process."""
    for module in ("paddleslim", "paddleslim_ops"):
        try:
            importlib.import_module(module)
        except ImportError:
            return False
    return True


def cpu_build_version() -> str | None:
    """Paddle's version when the ``paddle`` Python would import is the CPU wheel's.

    Read from the installed distributions without importing Paddle (1.7 s of CPU time on
    two cores, most of ``ftlab mode=plan``): the ``paddlepaddle`` wheel is a CPU build,
    which sees no GPU. None (import Paddle and ask it) for anything else: a CUDA wheel, a
    source build, or a ``paddle`` package that the ``paddlepaddle`` wheel did not install.
    """
    from importlib import metadata
    from importlib.util import find_spec

    try:
        dist = metadata.distribution("paddlepaddle")
        spec = find_spec("paddle")
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    init = next((f for f in dist.files or () if str(f) == "paddle/__init__.py"), None)
    if init is None or os.path.realpath(dist.locate_file(init)) != os.path.realpath(spec.origin):
        return None
    return dist.version


def probe_environment(requested: str = "auto") -> Environment:
    """This machine, for ``device=auto|cpu|gpu``; ``gpu`` without a visible GPU is refused."""
    version = cpu_build_version()
    if version is not None:
        return _cpu_environment(requested, version, cuda=False)
    import paddle

    gpu = has_gpu()
    if requested == "gpu" and not gpu:
        raise ConfigError(NO_GPU)
    cuda = paddle.device.is_compiled_with_cuda()
    if gpu and requested != "cpu":
        cap = paddle.device.cuda.get_device_capability()
        props = paddle.device.cuda.get_device_properties()
        return Environment(
            "gpu",
            paddle.device.cuda.device_count(),
            paddle.__version__,
            cap,
            cuda_build=True,
            paddleslim_ops=paddleslim_ops_importable(),
            device_memory_gib=props.total_memory / GIB,
            device_name=props.name,
        )
    return _cpu_environment(requested, paddle.__version__, cuda=cuda)


def _cpu_environment(requested: str, paddle_version: str, *, cuda: bool) -> Environment:
    if requested == "gpu":  # reached only without a visible GPU
        raise ConfigError(NO_GPU)
    return Environment(
        "cpu",
        os.cpu_count() or 1,
        paddle_version,
        cuda_build=cuda,
        device_memory_gib=ram_gib(),
    )


GIB = 2**30


def ram_gib() -> float | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None


def parse_compute_capability(text: str) -> tuple[int, int]:
    """``"8.0"`` -> ``(8, 0)``; anything else is a ``ConfigError`` naming the setting."""
    match = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(text))
    if not match:
        raise ConfigError(
            f"target.compute_capability={text!r}: write it as MAJOR.MINOR, e.g. 7.0 (V100), "
            "8.0 (A100), 8.9 (L40S), 9.0 (H100)."
        )
    return int(match.group(1)), int(match.group(2))


def layout_processes(run: RunConfig) -> int:
    """Processes per node the parallel layout asks for."""
    p = run.parallel
    return p.nproc_per_node or p.tensor * p.pipeline * p.sharding * (p.data or 1)


def target_environment(run: RunConfig) -> Environment:
    """The GPU machine ``run.target`` describes; nothing about this machine is probed.

    Its GPU count is ``target.gpus_per_node`` or, unset, what the layout needs per node;
    Paddle's version is this machine's (the one ftlab's checks were written against).
    """
    from importlib.metadata import PackageNotFoundError, version

    t = run.target
    if t.gpus_per_node is not None and t.gpus_per_node < 1:
        raise ConfigError(f"target.gpus_per_node={t.gpus_per_node}: must be >= 1 (or null).")
    paddle_version = "unknown"
    for dist in ("paddlepaddle-gpu", "paddlepaddle"):
        try:
            paddle_version = version(dist)
            break
        except PackageNotFoundError:
            continue
    return Environment(
        device="gpu",
        device_count=t.gpus_per_node or layout_processes(run),
        paddle_version=paddle_version,
        gpu_compute_capability=parse_compute_capability(t.compute_capability),
        cuda_build=True,
        paddleslim_ops=t.paddleslim_ops,
        described=True,
    )


def run_environment(run: RunConfig) -> Environment:
    """The machine a run is validated against.

    Training runs here, so it is probed. ``mode=plan`` and ``mode=export`` with
    ``device=gpu`` prepare a run for a GPU machine, which may be elsewhere: they validate
    against the machine the ``target`` settings describe, on any machine.
    """
    if run.mode in ("plan", "export") and run.device == "gpu":
        return target_environment(run)
    return probe_environment(run.device)
