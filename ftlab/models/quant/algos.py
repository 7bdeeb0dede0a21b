"""The quantization algorithms ftlab offers, and their names in PaddleNLP (no Paddle here).

The one table: ``method.quant_algo`` is checked against it, PaddleNLP's quantized loading
and ``mode=export`` translate through it, and the plan sizes codes and scales from it.
"""

from __future__ import annotations

# ftlab's quant_algo -> PaddleNLP's weight_quantize_algo (weight_only_* are per channel
# in PaddleNLP, blockwise in ftlab's backend).
PADDLENLP_ALGO: dict[str, str] = {
    "nf4": "nf4",
    "fp4": "fp4",
    "int8": "weight_only_int8",
    "int4": "weight_only_int4",
}
ALGOS: tuple[str, ...] = tuple(PADDLENLP_ALGO)
FOUR_BIT_ALGOS: tuple[str, ...] = ("nf4", "fp4", "int4")  # two codes per byte
DOUBLE_QUANT_BLOCK = 256  # block scales are themselves quantized to int8 per this many


def bytes_per_param(algo: str, block_size: int, double_quant: bool) -> float:
    """Codes + block scales per quantized parameter in ftlab's blockwise layout."""
    codes = 0.5 if algo in FOUR_BIT_ALGOS else 1.0
    scales = (1.0 + 8.0 / DOUBLE_QUANT_BLOCK) / block_size if double_quant else 4.0 / block_size
    return codes + scales
