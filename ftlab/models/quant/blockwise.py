"""Blockwise weight-only quantization written with plain Paddle tensor ops.

PaddleNLP's quantized paths need CUDA (PaddleSlim ops for nf4/fp4, GPU-only
``weight_quantize`` kernels for int8/int4), so ftlab carries its own implementation that
runs on any device Paddle runs on. The layout follows QLoRA (Dettmers et al. 2023):

* The weight is flattened in row-major order and cut into blocks of ``block_size``
  values (the last block is zero-padded). Each block keeps its absmax as an fp32 scale.
* 4-bit algorithms (``nf4``, ``fp4``, ``int4``) map ``value / absmax`` to the nearest
  entry of a 16-slot codebook and pack two 4-bit indices per uint8 (first value in the
  high nibble). ``int8`` stores ``round(value / absmax * 127)`` as int8.
* Optional double quantization stores the per-block absmax values as int8 in blocks of
  ``double_quant_block_size`` (default 256) after subtracting their mean, with one fp32
  scale per block of scales and one fp32 offset.

Codes are indices into ftlab's sorted codebooks, not bitsandbytes' bit layout: the values
are the same, the index order is not, so packed bytes are not interchangeable.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import paddle
import paddle.nn.functional as F

from ftlab.models.quant.algos import ALGOS, DOUBLE_QUANT_BLOCK, FOUR_BIT_ALGOS

__all__ = [
    "ALGOS",
    "FOUR_BIT_ALGOS",
    "FP4_CODEBOOK",
    "INT4_CODEBOOK",
    "NF4_CODEBOOK",
    "QuantizedTensor",
    "as_dtype",
    "codebook",
    "dequantize",
    "dtype_nbytes",
    "pack_4bit",
    "quantize",
    "tensor_nbytes",
    "unpack_4bit",
]

# NormalFloat4 of the QLoRA paper, values as published in bitsandbytes.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823029,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# bitsandbytes' FP4 (E2M1, exponent bias 3) magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12} divided
# by 12 so that the largest is 1. +0 and -0 coincide, leaving 15 distinct values.
_FP4_MAGNITUDES = (0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
FP4_CODEBOOK: tuple[float, ...] = tuple(
    [-m / 12.0 for m in reversed(_FP4_MAGNITUDES)] + [0.0] + [m / 12.0 for m in _FP4_MAGNITUDES]
)

# Symmetric int4: integers -7..7 over 7 (the asymmetric -8 is left out so that +absmax and
# -absmax are both exact). Treating it as a codebook gives it the same packed layout as nf4.
INT4_CODEBOOK: tuple[float, ...] = tuple(k / 7.0 for k in range(-7, 8))

_CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK, "int4": INT4_CODEBOOK}
_INT8_QMAX = 127.0

DTypeLike = str | paddle.dtype


_DTYPE_NAMES = {
    "float32": paddle.float32,
    "fp32": paddle.float32,
    "bfloat16": paddle.bfloat16,
    "bf16": paddle.bfloat16,
    "float16": paddle.float16,
    "fp16": paddle.float16,
}


def as_dtype(dtype: DTypeLike) -> paddle.dtype:
    """Resolve a dtype name (``float32``/``bfloat16``/``float16`` or short forms)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"dtype {dtype!r} is not a float dtype ftlab.models.quant computes in; "
                f"use one of {sorted(_DTYPE_NAMES)}"
            )
        return _DTYPE_NAMES[dtype]
    return dtype


def _check_algo(algo: str) -> None:
    if algo not in ALGOS:
        raise ValueError(f"quant_algo={algo!r} is not supported; choose one of {list(ALGOS)}")


def _check_block_size(name: str, block_size: int) -> None:
    # Even sizes keep the two nibbles of a packed byte inside one block.
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"{name}={block_size!r} must be an even integer >= 2 (e.g. 64)")


def codebook(algo: str) -> paddle.Tensor:
    """The sorted fp32 codebook of a 4-bit algorithm (values in [-1, 1])."""
    if algo not in _CODEBOOKS:
        raise ValueError(f"quant_algo={algo!r} has no codebook; 4-bit algorithms: {FOUR_BIT_ALGOS}")
    return paddle.to_tensor(_CODEBOOKS[algo], dtype="float32")


@cache
def _midpoints(algo: str) -> tuple[float, ...]:
    values = _CODEBOOKS[algo]
    return tuple((a + b) / 2.0 for a, b in itertools.pairwise(values))


@cache
def _pair_table_values(algo: str) -> tuple[tuple[float, float], ...]:
    # Row b holds the two values a packed byte b decodes to, so decoding is one lookup per
    # byte instead of shift + mask + interleave + lookup per value.
    values = _CODEBOOKS[algo]
    pad = len(values)  # indices past the codebook never occur; decode them to 0
    return tuple(
        (values[b >> 4] if (b >> 4) < pad else 0.0, values[b & 15] if (b & 15) < pad else 0.0)
        for b in range(256)
    )


def _pair_table(algo: str) -> paddle.Tensor:
    return paddle.to_tensor(_pair_table_values(algo), dtype="float32")


# --------------------------------------------------------------------------- packing


def pack_4bit(codes: paddle.Tensor) -> paddle.Tensor:
    """Pack integer codes in [0, 15] two per uint8 (first in the high nibble); odd counts pad 0."""
    flat = codes.flatten().astype("int32")
    if flat.shape[0] % 2:
        flat = paddle.concat([flat, paddle.zeros([1], dtype="int32")])
    pairs = flat.reshape([-1, 2])
    return (pairs[:, 0] * 16 + pairs[:, 1]).astype("uint8")


def unpack_4bit(packed: paddle.Tensor, numel: int) -> paddle.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``numel`` codes as int32."""
    as_int = packed.astype("int32")
    codes = paddle.stack([as_int // 16, as_int % 16], axis=-1).flatten()
    return codes[:numel]


# --------------------------------------------------------------------------- container


@dataclass
class QuantizedTensor:
    """A blockwise-quantized weight: codes, per-block scales and what is needed to decode.

    Exactly one of ``absmax`` (fp32, one per block) or the double-quantized triple
    (``qabsmax`` int8, ``absmax_scale`` fp32 per scale block, ``absmax_offset`` fp32 [1])
    is set.
    """

    codes: paddle.Tensor  # uint8 packed nibbles (4-bit algos) or int8 (int8)
    shape: tuple[int, ...]
    algo: str
    block_size: int
    absmax: paddle.Tensor | None = None
    qabsmax: paddle.Tensor | None = None
    absmax_scale: paddle.Tensor | None = None
    absmax_offset: paddle.Tensor | None = None
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    def tensors(self) -> dict[str, paddle.Tensor]:
        """The tensors that must be stored, by name (the names QuantLoRALinear buffers use)."""
        names = ["codes"] + (
            ["qabsmax", "absmax_scale", "absmax_offset"] if self.double_quant else ["absmax"]
        )
        return {name: getattr(self, name) for name in names}

    def nbytes(self) -> int:
        """Bytes of codes plus scales: the memory the frozen weight costs once quantized."""
        return sum(tensor_nbytes(t) for t in self.tensors().values())

    def scale_nbytes(self) -> int:
        """Bytes spent on scales only (what double quantization shrinks)."""
        return sum(tensor_nbytes(t) for name, t in self.tensors().items() if name != "codes")

    def block_absmax(self) -> paddle.Tensor:
        """Per-block fp32 absmax, undoing double quantization when it was used."""
        if not self.double_quant:
            return self.absmax
        n_sblocks = self.absmax_scale.shape[0]
        q = self.qabsmax.astype("float32")
        pad = n_sblocks * self.double_quant_block_size - q.shape[0]
        if pad:
            q = paddle.concat([q, paddle.zeros([pad], dtype="float32")])
        scales = q.reshape([n_sblocks, -1]) * self.absmax_scale.unsqueeze(1)
        return scales.flatten()[: self.num_blocks] + self.absmax_offset


def dtype_nbytes(dtype: DTypeLike) -> int:
    """Bytes per element of a paddle dtype."""
    return paddle.empty([0], dtype=as_dtype(dtype)).element_size()


def tensor_nbytes(t: paddle.Tensor) -> int:
    """Bytes of a tensor's data (works on lazily created, not yet allocated parameters)."""
    return int(math.prod(t.shape)) * dtype_nbytes(t.dtype)


# --------------------------------------------------------------------------- quantize


def _blocks(weight: paddle.Tensor, block_size: int) -> paddle.Tensor:
    """Flatten to fp32 and reshape into [num_blocks, block_size], zero-padding the tail."""
    flat = weight.flatten()
    if flat.dtype != paddle.float32:
        flat = flat.astype("float32")
    pad = (-flat.shape[0]) % block_size
    if pad:
        flat = paddle.concat([flat, paddle.zeros([pad], dtype="float32")])
    return flat.reshape([-1, block_size])


def _safe_divisor(absmax: paddle.Tensor) -> paddle.Tensor:
    # An all-zero block has absmax 0; divide it by 1 so its codes decode to exactly 0.
    return paddle.where(absmax > 0, absmax, paddle.ones_like(absmax))


def _double_quantize(absmax: paddle.Tensor, block_size: int) -> dict[str, paddle.Tensor]:
    offset = absmax.mean().reshape([1])
    centered = absmax - offset
    blocks = _blocks(centered, block_size)
    scale = blocks.abs().max(axis=1) / _INT8_QMAX
    q = paddle.round(blocks / _safe_divisor(scale).unsqueeze(1))
    q = q.clip(-_INT8_QMAX, _INT8_QMAX).astype("int8").flatten()[: absmax.shape[0]]
    return {"qabsmax": q, "absmax_scale": scale, "absmax_offset": offset}


def quantize(
    weight: paddle.Tensor,
    algo: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK,
) -> QuantizedTensor:
    """Quantize ``weight`` blockwise; see the module docstring for the layout.

    Runs under ``no_grad`` and works on a detached fp32 copy, so the caller's tensor (any
    float dtype) is left untouched and can be freed right after.
    """
    _check_algo(algo)
    _check_block_size("quant_block_size", block_size)
    if double_quant:
        _check_block_size("double_quant_block_size", double_quant_block_size)
    if not paddle.is_floating_point(weight):
        raise TypeError(f"quantize expects a float tensor, got dtype {weight.dtype}")
    with paddle.no_grad():
        blocks = _blocks(weight.detach(), block_size)
        absmax = blocks.abs().max(axis=1)
        if not bool(paddle.isfinite(absmax).all()):
            raise ValueError(
                f"weight of shape {list(weight.shape)} holds inf/NaN values; blockwise "
                "quantization needs finite weights (check the checkpoint)"
            )
        normalized = blocks / _safe_divisor(absmax).unsqueeze(1)
        if algo == "int8":
            codes = paddle.round(normalized * _INT8_QMAX).astype("int8").flatten()
        else:
            mids = paddle.to_tensor(_midpoints(algo), dtype="float32")
            # searchsorted on the midpoints == nearest codebook entry (ties go to the lower).
            idx = paddle.searchsorted(mids, normalized.flatten(), out_int32=True)
            codes = pack_4bit(idx)
        qt = QuantizedTensor(
            codes=codes,
            shape=tuple(int(s) for s in weight.shape),
            algo=algo,
            block_size=block_size,
            double_quant_block_size=double_quant_block_size,
        )
        if double_quant:
            for name, t in _double_quantize(absmax, double_quant_block_size).items():
                setattr(qt, name, t)
        else:
            qt.absmax = absmax
    return qt


def dequantize(qt: QuantizedTensor, dtype: DTypeLike = "float32") -> paddle.Tensor:
    """Decode ``qt`` back to a dense tensor of its original shape in ``dtype``.

    Decoding is done in fp32 (then cast) so that bf16/fp16 results are the rounding of the
    fp32 ones, independent of the compute dtype.
    """
    with paddle.no_grad():
        absmax = qt.block_absmax().unsqueeze(1)
        if qt.algo == "int8":
            values = qt.codes.astype("float32").reshape([-1, qt.block_size])
            dense = values * (absmax / _INT8_QMAX)
        elif qt.algo in FOUR_BIT_ALGOS:
            # One embedding lookup per packed byte yields both of its values; measured
            # faster on CPU than gather or unpack-then-lookup.
            pairs = F.embedding(qt.codes.astype("int64"), _pair_table(qt.algo))
            dense = pairs.reshape([-1, qt.block_size]) * absmax
        else:
            _check_algo(qt.algo)
        flat = dense.flatten()
        if flat.shape[0] != qt.numel:
            flat = flat[: qt.numel]
        out = flat.reshape(list(qt.shape))
        target = as_dtype(dtype)
        if out.dtype != target:
            out = out.astype(target)
    return out
