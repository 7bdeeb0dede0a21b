"""ftlab's device-independent blockwise weight-only quantization and QLoRA layer.

Pure Paddle tensor ops, no custom kernels: runs wherever Paddle runs (CPU included), unlike
PaddleNLP's quantized paths which all need CUDA. See ``backend.native_backend_available``
for choosing between the two.
"""

from ftlab.quant.backend import native_backend_available
from ftlab.quant.blockwise import (
    ALGOS,
    FP4_CODEBOOK,
    INT4_CODEBOOK,
    NF4_CODEBOOK,
    QuantizedTensor,
    codebook,
    dequantize,
    pack_4bit,
    quantize,
    unpack_4bit,
)
from ftlab.quant.loading import SafetensorsSource, quantize_while_loading
from ftlab.quant.qlinear import (
    QLoRASpec,
    QuantizeReport,
    QuantLoRALinear,
    dequantize_and_merge,
    find_target_linears,
    load_lora_state_dict,
    lora_state_dict,
    quant_config,
    quantize_model,
)

__all__ = [
    "ALGOS",
    "FP4_CODEBOOK",
    "INT4_CODEBOOK",
    "NF4_CODEBOOK",
    "QLoRASpec",
    "QuantLoRALinear",
    "QuantizeReport",
    "QuantizedTensor",
    "SafetensorsSource",
    "codebook",
    "dequantize",
    "dequantize_and_merge",
    "find_target_linears",
    "load_lora_state_dict",
    "lora_state_dict",
    "native_backend_available",
    "pack_4bit",
    "quant_config",
    "quantize",
    "quantize_model",
    "quantize_while_loading",
    "unpack_4bit",
]
