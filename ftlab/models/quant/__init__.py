"""ftlab's device-independent blockwise weight-only quantization and QLoRA layer.

Pure Paddle tensor ops, no custom kernels: runs wherever Paddle runs (CPU included), unlike
PaddleNLP's quantized paths which all need CUDA. See ``backend.native_backend_available``
for choosing between the two.

The names below are imported from their submodules on first use, so that importing the
Paddle-free ``ftlab.models.quant.algos`` (what the QLoRA method's settings and the plan
need) does not import Paddle.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "native_backend_available": "backend",
    "SafetensorsSource": "loading",
    "quantize_while_loading": "loading",
    **dict.fromkeys(
        (
            "ALGOS",
            "FP4_CODEBOOK",
            "INT4_CODEBOOK",
            "NF4_CODEBOOK",
            "QuantizedTensor",
            "codebook",
            "dequantize",
            "pack_4bit",
            "quantize",
            "unpack_4bit",
        ),
        "blockwise",
    ),
    **dict.fromkeys(
        (
            "QLoRASpec",
            "QuantizeReport",
            "QuantLoRALinear",
            "dequantize_and_merge",
            "find_target_linears",
            "load_lora_state_dict",
            "lora_state_dict",
            "quant_config",
            "quantize_model",
        ),
        "qlinear",
    ),
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
    globals()[name] = value  # later lookups (and monkeypatching in tests) see it directly
    return value
