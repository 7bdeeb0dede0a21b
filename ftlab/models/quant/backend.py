"""Can PaddleNLP's own quantized kernels run here? (The ``quant_backend=auto`` decision.)

PaddleNLP's weight-only int8/int4 kernels exist only for CUDA GPUs of the compute
capabilities Paddle lists, and its nf4/fp4 path imports PaddleSlim's CUDA extension
(``paddleslim_ops``); without it PaddleNLP turns quantized LoRA off without an error.
So the probe checks every link and names the first one missing.
"""

from __future__ import annotations

import importlib

import paddle

from ftlab.models.quant.algos import ALGOS

__all__ = ["NATIVE_SUPPORTED_SM", "native_backend_available"]

# Compute capabilities Paddle's weight-only kernels accept ("arch only support 70, 75, 80,
# 86, 89, 90" in Paddle 3.x).
NATIVE_SUPPORTED_SM: tuple[int, ...] = (70, 75, 80, 86, 89, 90)


def native_backend_available(algo: str = "nf4") -> tuple[bool, str]:
    """``(True, what was found)`` when PaddleNLP's quantized path can run ``algo`` here,
    else ``(False, why not and what would fix it)``. Cheap; imports PaddleSlim only on GPU.
    """
    if algo not in ALGOS:
        raise ValueError(f"quant_algo={algo!r} is not supported; choose one of {ALGOS}")
    if not paddle.is_compiled_with_cuda():
        return False, (
            "paddle is a CPU build (no CUDA); PaddleNLP's quantized kernels need a CUDA GPU, "
            "use quant_backend=ftlab"
        )
    try:
        n_gpu = paddle.device.cuda.device_count()
    except RuntimeError as err:  # driver problems surface here
        return False, f"CUDA build but querying GPUs failed: {err}"
    if n_gpu == 0:
        return False, "paddle has CUDA support but sees no GPU (check CUDA_VISIBLE_DEVICES)"
    major, minor = paddle.device.cuda.get_device_capability()
    sm = major * 10 + minor
    if sm not in NATIVE_SUPPORTED_SM:
        return False, (
            f"GPU compute capability {major}.{minor} (sm{sm}) is not among Paddle's weight-only "
            f"kernel archs {list(NATIVE_SUPPORTED_SM)}"
        )
    if algo in ("nf4", "fp4"):
        for module in ("paddleslim", "paddleslim_ops"):
            try:
                importlib.import_module(module)
            except ImportError as err:
                return False, (
                    f"{algo} in PaddleNLP needs PaddleSlim's CUDA ops; importing {module} "
                    f"failed ({err}). Build PaddleSlim with its csrc/setup_cuda.py, or use "
                    "quant_backend=ftlab"
                )
        return True, f"GPU sm{sm} with paddleslim and paddleslim_ops importable"
    # int8/int4 map to PaddleNLP weight_only_int8/int4: per-channel scales, not blockwise.
    return True, (
        f"GPU sm{sm}: PaddleNLP weight_only_{algo} kernels available (per-channel scales; "
        "the block size setting does not apply to them)"
    )
