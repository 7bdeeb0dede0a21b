"""ftlab's device-independent blockwise weight-only quantization and QLoRA layer.

Pure Paddle tensor ops, no custom kernels: runs wherever Paddle runs (CPU included), unlike
PaddleNLP's quantized paths which all need CUDA. See ``backend.native_backend_available``
for choosing between the two.

The package imports nothing, so that the Paddle-free ``ftlab.models.quant.algos`` (what the
QLoRA method's settings and the plan need) does not import Paddle: ``blockwise`` (codes,
codebooks, pack/unpack), ``qlinear`` (the QLoRA layer, quantizing a model), ``loading``
(quantizing while reading safetensors) and ``backend`` are imported by name.
"""
