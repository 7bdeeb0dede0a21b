"""Can PaddleNLP's own quantized kernels run? (The ``quant_backend=auto`` decision.)

PaddleNLP's weight-only int8/int4 kernels exist only for CUDA GPUs of the compute
capabilities Paddle lists, and its nf4/fp4 path imports PaddleSlim's CUDA extension
(``paddleslim_ops``); without it PaddleNLP turns quantized LoRA off without an error.
So the answer checks every link and names the first one missing. It reads the facts from
an ``Environment`` (``ftlab.config.environment``, the one device probe): this machine's,
or the GPU machine a plan or an export is made for, whose facts are assumed.
"""

from __future__ import annotations

from ftlab.config.environment import Environment, probe_environment
from ftlab.models.quant.algos import ALGOS

__all__ = ["NATIVE_SUPPORTED_SM", "native_backend_available"]

# Compute capabilities Paddle's weight-only kernels accept ("arch only support 70, 75, 80,
# 86, 89, 90" in Paddle 3.x).
NATIVE_SUPPORTED_SM: tuple[int, ...] = (70, 75, 80, 86, 89, 90)


def native_backend_available(algo: str = "nf4", env: Environment | None = None) -> tuple[bool, str]:
    """``(True, what was found)`` when PaddleNLP's quantized path can run ``algo`` on ``env``
    (this machine when None), else ``(False, why not and what would fix it)``."""
    if algo not in ALGOS:
        raise ValueError(f"quant_algo={algo!r} is not supported; choose one of {ALGOS}")
    env = env if env is not None else probe_environment("auto")
    where = "the target GPU machine (described, not probed)" if env.described else "here"
    if env.device != "gpu":
        if env.is_cuda_build:
            return False, "paddle has CUDA support but sees no GPU (check CUDA_VISIBLE_DEVICES)"
        return False, (
            "paddle is a CPU build (no CUDA); PaddleNLP's quantized kernels need a CUDA GPU, "
            "use quant_backend=ftlab"
        )
    major, minor = env.gpu_compute_capability or (0, 0)
    sm = major * 10 + minor
    if sm not in NATIVE_SUPPORTED_SM:
        return False, (
            f"GPU compute capability {major}.{minor} (sm{sm}) {where} is not among Paddle's "
            f"weight-only kernel archs {list(NATIVE_SUPPORTED_SM)}"
        )
    if algo in ("nf4", "fp4"):
        if not env.paddleslim_ops:
            fix = (
                "set target.paddleslim_ops=true once it is installed there"
                if env.described
                else "build PaddleSlim with its csrc/setup_cuda.py"
            )
            return False, (
                f"{algo} in PaddleNLP needs PaddleSlim's CUDA ops (paddleslim, paddleslim_ops), "
                f"which are not available {where}: {fix}, or use quant_backend=ftlab"
            )
        return True, f"GPU sm{sm} with PaddleSlim's CUDA ops {where}"
    # int8/int4 map to PaddleNLP weight_only_int8/int4: per-channel scales, not blockwise.
    return True, (
        f"GPU sm{sm} {where}: PaddleNLP weight_only_{algo} kernels (per-channel scales; "
        "the block size setting does not apply to them)"
    )
