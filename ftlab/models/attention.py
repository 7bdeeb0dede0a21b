"""Attention masks on CPU: FlashMask indices expanded at the attention call, and masks
that count under CPU flash attention.

**FlashMask** (``model.flash_mask=true``) describes a packed row's mask by one int32 per
key column, ``attn_mask_startend_row_indices`` (the collator builds ``[B, 1, L]``; the
model's fusion op unsqueezes it to FlashMask's ``[B, 1, L, 1]``): with the causal mask,
query row ``i`` may attend key column ``j`` iff ``j <= i < start[j]``. A column of
example ``[s, e)`` has ``start = e``; padding columns have ``start = 0`` (what PaddleNLP's
tokenizer pads with), so nothing attends them and padding rows attend nothing, exactly
as in the dense block-diagonal mask PaddleNLP's zero padding builds. The data pipeline,
the collator and the loader therefore hold O(L) per row instead of O(L^2).

PaddlePaddle's CPU build has no FlashMask kernel (``flashmask_attention`` fails on CPU),
so on CPU ``install_cpu_attention`` wraps each attention layer's ``attn_func`` (PaddleNLP's
Llama and Qwen2 call attention through it): when indices arrive on CPU tensors, the
wrapper expands them into the equivalent additive mask (the conversion PaddleNLP's
``_prepare_decoder_attention_mask`` applies to a dense mask, so the numbers are those of
the dense path) once per forward (every layer reuses it; it is released when the
model's forward returns) and attends with it. On GPU tensors the wrapper steps aside and
PaddleNLP's FlashMask kernel runs.

**CPU flash attention ignores masks.** PaddleNLP's fusion op calls
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)``; on CPU that
dispatches to Paddle's math kernel, which with ``is_causal=True`` applies only the causal
triangle and drops ``attn_mask`` (measured: with ``model.flash_attention=true`` a packed
batch's second example attended the first, logits off by 12.9). The wrapper therefore
calls the kernel with the mask and ``is_causal=False`` (the mask already holds the causal
part) whenever a mask reaches the flash path on CPU: packed dense masks, FlashMask
indices, and left-padded generation batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftlab.config.schema import ModelConfig

log = logging.getLogger(__name__)


def expand_startend_row_indices_np(indices: np.ndarray) -> np.ndarray:
    """The boolean ``[B, 1, L, L]`` mask (True = may attend) of causal FlashMask indices.

    ``indices`` is ``[B, L]``, ``[B, 1, L]`` or ``[B, 1, L, 1]`` (lower-triangle start rows).
    """
    idx = np.asarray(indices)
    batch, width = idx.shape[0], idx.shape[-2] if idx.ndim == 4 else idx.shape[-1]
    start = idx.reshape(batch, 1, 1, width)
    rows = np.arange(width).reshape(1, 1, width, 1)
    cols = np.arange(width).reshape(1, 1, 1, width)
    return (cols <= rows) & (rows < start)


def expand_startend_row_indices(indices: Any) -> Any:
    """Paddle version of ``expand_startend_row_indices_np`` (bool tensor ``[B, 1, L, L]``)."""
    import paddle

    batch = indices.shape[0]
    width = indices.shape[-2] if indices.ndim == 4 else indices.shape[-1]
    start = indices.reshape([batch, 1, 1, width]).astype("int64")
    rows = paddle.arange(width, dtype="int64").reshape([1, 1, width, 1])
    cols = paddle.arange(width, dtype="int64").reshape([1, 1, 1, width])
    return paddle.logical_and(cols <= rows, rows < start)


class _MaskCache:
    """The expanded mask of the indices being attended now: built by the first layer of a
    forward, reused by the others, dropped when the model's forward returns."""

    def __init__(self, to_additive: Callable[[Any, Any], Any]) -> None:
        self.to_additive = to_additive
        self.indices: Any = None
        self.mask: Any = None
        self.expansions = 0  # how many masks were built (tests check the reuse)

    def mask_for(self, indices: Any, dtype: Any) -> Any:
        if self.indices is not indices:
            bool_mask = expand_startend_row_indices(indices)
            self.mask = self.to_additive(bool_mask, dtype)
            self.indices = indices
            self.expansions += 1
        return self.mask

    def clear(self, *_: Any) -> None:
        self.indices = self.mask = None


def _on_cpu(tensor: Any) -> bool:
    return bool(tensor.place.is_cpu_place())


def _sdpa_with_mask(
    query: Any, key: Any, value: Any, mask: Any, output_attentions: bool, sequence_parallel: bool
) -> Any:
    """Flash-path attention that honours ``mask`` on CPU (see the module docstring)."""
    import paddle.nn.functional as F

    bsz, q_len, num_heads, _ = query.shape
    head_dim = value.shape[-1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=False)
    shape = [bsz * q_len, head_dim * num_heads] if sequence_parallel else [bsz, q_len, -1]
    out = out.reshape(shape)
    return (out, None) if output_attentions else out


def _wrap(original: Callable[..., Any], cache: _MaskCache) -> Callable[..., Any]:
    def attn_func(
        query: Any,
        config: Any,
        key: Any,
        value: Any,
        attention_mask: Any,
        output_attentions: bool,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        indices = kwargs.get("attn_mask_startend_row_indices")
        if not _on_cpu(query):
            return original(
                query, config, key, value, attention_mask, output_attentions, *args, **kwargs
            )
        if indices is not None:
            attention_mask = cache.mask_for(indices, query.dtype)
            kwargs["attn_mask_startend_row_indices"] = None
        alibi = kwargs.get("alibi", args[0] if args else None)
        if attention_mask is None or not config.use_flash_attention or alibi is not None:
            return original(
                query, config, key, value, attention_mask, output_attentions, *args, **kwargs
            )
        return _sdpa_with_mask(
            query,
            key,
            value,
            attention_mask,
            output_attentions,
            bool(kwargs.get("sequence_parallel", False)),
        )

    attn_func.ftlab_cpu_attention = True  # type: ignore[attr-defined]
    return attn_func


def additive_mask(bool_mask: Any, dtype: Any) -> Any:
    """0 where attending, the dtype's lowest value elsewhere: the conversion PaddleNLP's
    ``_prepare_decoder_attention_mask`` applies to dense masks on CPU (so a fully masked
    padding row softmaxes to a finite uniform row instead of NaN)."""
    import paddle

    return paddle.where(bool_mask, 0.0, paddle.finfo(dtype).min).astype(dtype)


def install_cpu_attention(model: Any) -> int:
    """Wrap every attention layer's ``attn_func`` of ``model``; returns how many.

    Idempotent. On GPU tensors the wrappers call PaddleNLP's functions unchanged, so the
    install is safe on any device; it matters on CPU (see the module docstring).
    """
    layers = [m for m in model.sublayers(include_self=True) if hasattr(m, "attn_func")]
    todo = [m for m in layers if not getattr(m.attn_func, "ftlab_cpu_attention", False)]
    if not todo:
        return len(layers)
    cache = _MaskCache(additive_mask)
    for layer in todo:
        layer.attn_func = _wrap(layer.attn_func, cache)
    model.register_forward_post_hook(lambda *_: cache.clear())
    model.ftlab_mask_cache = cache
    log.info("CPU attention: %d attention layers honour masks and FlashMask indices", len(todo))
    return len(layers)


# --------------------------------------------------------------------------- the path


@dataclass(frozen=True)
class AttentionPath:
    """Which attention a run takes and which masks it holds (validation records it, the
    plan counts it). ``kernel``: ``flash`` (GPU flash attention), ``cpu_math`` (Paddle's
    CPU flash attention: its math kernel, scores materialized), ``eager`` (PaddleNLP's
    matmul-softmax attention). ``mask``: ``flashmask`` (indices), ``dense`` (packed
    block-diagonal), ``padding`` (unpacked rows)."""

    kernel: str
    mask: str

    @property
    def name(self) -> str:
        return f"{self.kernel}+{self.mask}"

    @property
    def scores_kept(self) -> bool:
        """The ``[B, H, L, L]`` scores exist (and their softmax is saved for backward)."""
        return self.kernel != "flash"

    def collated_mask_bytes(self, seq_len: int) -> int:
        """Bytes of the mask one collated row carries (what the data loader holds)."""
        return {"flashmask": 4 * seq_len, "dense": seq_len**2, "padding": 8 * seq_len}[self.mask]

    def model_mask_bytes(self, seq_len: int, act_bytes: int) -> int:
        """Bytes of the ``[1, 1, L, L]`` mask the model builds per row (0 with FlashMask on
        GPU; on CPU the indices are expanded to it at the attention call)."""
        if self.mask == "flashmask" and self.kernel == "flash":
            return 0
        return act_bytes * seq_len**2

    def describe(self) -> str:
        kernel = {
            "flash": "flash attention",
            "cpu_math": "flash attention (CPU: Paddle's math kernel, scores materialized)",
            "eager": "eager attention (scores materialized)",
        }[self.kernel]
        mask = {
            "flashmask": "FlashMask indices [B, 1, L] int32"
            + (
                ", no L x L mask"
                if self.kernel == "flash"
                else ", expanded to [B, 1, L, L] at the attention call (no CPU kernel)"
            ),
            "dense": "dense block-diagonal mask [B, L, L] bool, [B, 1, L, L] in the model",
            "padding": "padding mask [B, L], [B, 1, L, L] in the model",
        }[self.mask]
        return f"{kernel}; {mask}"


def attention_path(model: ModelConfig, packing: str, device: str) -> AttentionPath:
    """The path a run with these settings takes on ``device`` (cpu | gpu)."""
    if model.flash_attention:
        kernel = "flash" if device == "gpu" else "cpu_math"
    else:
        kernel = "eager"
    if packing == "none":
        mask = "padding"
    else:
        mask = "flashmask" if model.flash_mask else "dense"
    return AttentionPath(kernel, mask)
