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
Llama and Qwen2 call attention through it). When indices arrive on CPU tensors under flash
attention, the wrapper reads each row's example spans from them once per forward (every
layer reuses them) and attends each example alone under a causal ``[n, n]`` mask: scores
cost ``sum(n_i^2)`` instead of ``L^2`` and no ``L x L`` mask exists, which is what the GPU
kernel gains by skipping fully masked tiles. Indices that are not block-diagonal (none
that ftlab's collator builds), and the eager path, get the indices expanded into the
equivalent additive mask instead (the conversion PaddleNLP's
``_prepare_decoder_attention_mask`` applies to a dense mask), once per forward. Either
way the cache is released when the model's forward returns (a recomputing backward
rebuilds it once). On GPU tensors the wrapper steps aside and PaddleNLP's FlashMask
kernel runs.

**CPU flash attention ignores masks.** PaddleNLP's fusion op calls
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)``; on CPU that
dispatches to Paddle's math kernel, which with ``is_causal=True`` applies only the causal
triangle and drops ``attn_mask`` (measured: with ``model.flash_attention=true`` a packed
batch's second example attended the first, logits off by 12.9). The wrapper therefore
attends with the mask itself (``_attend``: Paddle's math kernel, the mask holding the
causal part) whenever a mask reaches the flash path on CPU: packed dense masks, FlashMask
indices, and left-padded generation batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftlab.config.schema import ModelConfig
from ftlab.models.cpu_layers import FAST_MODULES, fast_cpu_layers

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


def document_spans(indices: np.ndarray) -> list[list[tuple[int, int]]] | None:
    """Per row, the ``(start, end)`` of each example of block-diagonal causal FlashMask
    indices ``[B, L]`` (padding excluded), or None when they are not block-diagonal.

    Block-diagonal is what packing builds: every column of an example ``[s, e)`` holds
    ``e``, and the padding after the last example holds 0. Anything else (e.g. a mask with
    a shared prompt) is left to the full expansion.
    """
    rows: list[list[tuple[int, int]]] = []
    width = indices.shape[-1]
    for row in indices.reshape(indices.shape[0], width):
        spans, start = [], 0
        while start < width and row[start] != 0:
            end = int(row[start])
            if not start < end <= width or (row[start:end] != end).any():
                return None
            spans.append((start, end))
            start = end
        if (row[start:] != 0).any():
            return None
        rows.append(spans)
    return rows


class _MaskCache:
    """What the layers of one forward share about the indices being attended now: their
    example spans (block-diagonal indices), else their expanded mask; built by the first
    layer, reused by the others, dropped when the model's forward returns (a recomputing
    backward rebuilds them once more)."""

    def __init__(self, to_additive: Callable[[Any, Any], Any]) -> None:
        self.to_additive = to_additive
        self.indices: Any = None
        self.spans: list[list[tuple[int, int]]] | None = None
        self.mask: Any = None
        self.causal: dict[tuple[int, Any], Any] = {}
        self.spans_read = False  # in this forward (spans may be None: not block-diagonal)
        self.expansions = 0  # how many L x L masks were built (tests check the reuse)
        self.span_reads = 0  # how many times spans were read from indices

    def _use(self, indices: Any) -> None:
        if self.indices is not indices:
            self.clear()
            self.indices = indices

    def spans_for(self, indices: Any) -> list[list[tuple[int, int]]] | None:
        self._use(indices)
        if not self.spans_read:
            self.spans = document_spans(indices.numpy())
            self.spans_read = True
            self.span_reads += 1
        return self.spans

    def mask_for(self, indices: Any, dtype: Any) -> Any:
        self._use(indices)
        if self.mask is None:
            bool_mask = expand_startend_row_indices(indices)
            self.mask = self.to_additive(bool_mask, dtype)
            self.expansions += 1
        return self.mask

    def causal_mask(self, n: int, dtype: Any) -> Any:
        """The additive causal ``[n, n]`` mask of one example (shared by every example of
        that length in this forward)."""
        key = (n, dtype)
        if key not in self.causal:
            import paddle

            tri = np.tril(np.ones((n, n), dtype=bool))
            self.causal[key] = self.to_additive(paddle.to_tensor(tri), dtype)
        return self.causal[key]

    def clear(self, *_: Any) -> None:
        self.indices = self.spans = self.mask = None
        self.spans_read = False
        self.causal = {}


def _on_cpu(tensor: Any) -> bool:
    return bool(tensor.place.is_cpu_place())


def _repeat_kv(states: Any, repeats: int) -> Any:
    """``[B, L, Hkv, D]`` -> ``[B, L, Hkv * repeats, D]`` (grouped-query attention), as
    Paddle's ``scaled_dot_product_attention`` repeats keys and values."""
    if repeats == 1:
        return states
    return states.unsqueeze(3).expand([-1, -1, -1, repeats, -1]).flatten(2, 3)


def _attend(query: Any, key: Any, value: Any, mask: Any) -> Any:
    """Softmax attention with an additive mask: Paddle's CPU math kernel
    (``flash_attention._math_attention``: ``q * scale``, ``q k^T``, ``+ mask``, softmax,
    ``p v``; equal to it to the last bit, measured), laid out heads first.

    ``query`` ``[B, L, H, D]``, ``key``/``value`` ``[B, Lk, Hkv, D]``, ``mask``
    ``[B or 1, 1, L, Lk]`` or ``[L, Lk]``; returns ``[B, L, H, D]``. Why heads first: the
    scores are ``[H, B, L, Lk]``, so a mask shared by the heads broadcasts over the leading
    axis, and Paddle's CPU add does that about 3x faster than over the head axis of
    ``[B, H, L, Lk]`` (measured at L=2048, 8 heads: 119 vs 347 ms per add, one per layer
    and forward).
    """
    import paddle
    import paddle.nn.functional as F

    bsz, q_len, num_heads, head_dim = query.shape
    repeats = num_heads // key.shape[2]
    order = [2, 0, 1, 3]  # [B, L, H, D] -> [H, B, L, D]
    q = query.transpose(order)
    k = _repeat_kv(key, repeats).transpose(order)
    v = _repeat_kv(value, repeats).transpose(order)
    scores = paddle.matmul(q * head_dim**-0.5, k, transpose_y=True)
    if mask.dtype == paddle.bool:  # as Paddle's scaled_dot_product_attention converts it
        mask = paddle.where(
            mask, paddle.to_tensor(0.0, query.dtype), paddle.to_tensor(-float("inf"), query.dtype)
        )
    if mask.ndim == 4:
        # [B, 1, L, Lk] -> [B, L, Lk] (free: the head axis has size 1); a per-head mask
        # [B, H, L, Lk] is moved to the scores' layout instead.
        mask = (
            mask.reshape([mask.shape[0], *mask.shape[2:]])
            if mask.shape[1] == 1
            else (mask.transpose([1, 0, 2, 3]))
        )
    weights = F.softmax(scores + mask)
    return paddle.matmul(weights, v).transpose([1, 2, 0, 3])


def _attend_documents(
    query: Any, key: Any, value: Any, spans: list[list[tuple[int, int]]], cache: _MaskCache
) -> Any:
    """Block-diagonal causal attention computed per example: each example ``[s, e)``
    attends within itself under a causal ``[n, n]`` mask, so the scores are
    ``sum(n_i^2)`` instead of ``L^2`` and no ``L x L`` mask exists (on CPU, what
    FlashMask's kernel gains on GPU by skipping masked tiles).

    Same function as ``_attend`` with the expanded mask: outside its example a query's
    scores are ``-inf``-like (``finfo.min``) and their softmax weights exactly 0. A padding
    row attends nothing; under the expanded mask its scores are all ``finfo.min`` and its
    softmax uniform, so it gets the mean of every value row, as here. Nothing attends a
    padding column, so padding never reaches the examples either way.
    """
    import paddle

    bsz, width, num_heads, _ = query.shape
    repeats = num_heads // key.shape[2]
    rows = []
    for b, row_spans in enumerate(spans):
        sections = [e - s for s, e in row_spans]
        pad = width - sum(sections)
        q, k, v = (t[b : b + 1] for t in (query, key, value))
        if bsz == 1 and not pad and len(sections) == 1:
            parts = [(q, k, v)]
        else:
            split = [*sections, pad] if pad else sections
            parts = list(zip(*(paddle.split(t, split, axis=1) for t in (q, k, v)), strict=True))
        outs = [
            _attend(qd, kd, vd, cache.causal_mask(n, query.dtype))
            for n, (qd, kd, vd) in zip(sections, parts, strict=False)  # parts[-1]: padding
        ]
        if pad:
            uniform = _repeat_kv(v.mean(axis=1, keepdim=True), repeats)
            outs.append(uniform.expand([1, pad, num_heads, uniform.shape[-1]]))
        rows.append(outs[0] if len(outs) == 1 else paddle.concat(outs, axis=1))
    return rows[0] if len(rows) == 1 else paddle.concat(rows, axis=0)


def _flash_output(out: Any, output_attentions: bool, sequence_parallel: bool) -> Any:
    """``[B, L, H, D]`` in the shape PaddleNLP's flash path returns."""
    bsz, q_len, num_heads, head_dim = out.shape
    shape = [bsz * q_len, head_dim * num_heads] if sequence_parallel else [bsz, q_len, -1]
    out = out.reshape(shape)
    return (out, None) if output_attentions else out


# The eager attention functions that are exactly ``softmax(q k^T / sqrt(d) + mask) v``
# (DeepSeek's, for one, scales by its own ``softmax_scale`` and is left alone).
_PLAIN_EAGER_MODULES = frozenset(FAST_MODULES)


def _plain_eager(original: Callable[..., Any]) -> bool:
    func = getattr(original, "func", original)  # PaddleNLP binds options with partial
    return (
        getattr(func, "__module__", None) in _PLAIN_EAGER_MODULES
        and getattr(func, "__name__", None) == "scaled_dot_product_attention"
    )


def _eager_as_attend(
    query: Any, config: Any, output_attentions: bool, args: tuple, kwargs: dict[str, Any]
) -> bool:
    """Whether PaddleNLP's eager attention may be computed by ``_attend`` on CPU.

    Why: the function is the same (``softmax(q k^T / sqrt(d) + mask) v``; logits and
    gradients equal to 1e-5, tested), but PaddleNLP's eager path adds the ``[B, 1, L, L]``
    mask over the head axis of ``[B, H, L, L]`` scores and casts them to float32 and back
    around the softmax, which on Paddle's CPU kernels costs about a third more per layer
    (forward + backward at the default run's batch 16 x 137 tokens, 8 heads: 96 vs 70 ms,
    median of 10). Only the plain case is taken: float32, no attention weights asked for,
    no attention dropout, no sequence-parallel reshard (the caller has excluded alibi);
    anything else keeps PaddleNLP's function. Part of the CPU fast path
    (``ftlab.models.cpu_layers.use_fast_cpu_layers``)."""
    import paddle

    reshard = kwargs.get("reshard_layer", args[3] if len(args) > 3 else None)
    dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    return (
        fast_cpu_layers()
        and query.dtype == paddle.float32
        and not output_attentions
        and reshard is None
        and (dropout == 0.0 or not kwargs.get("training", True))
    )


def _wrap(original: Callable[..., Any], cache: _MaskCache) -> Callable[..., Any]:
    plain_eager = _plain_eager(original)

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
        alibi = kwargs.get("alibi", args[0] if args else None)
        flash = bool(config.use_flash_attention) and alibi is None
        sequence_parallel = bool(kwargs.get("sequence_parallel", False))
        if indices is not None:
            kwargs["attn_mask_startend_row_indices"] = None
            if flash and query.shape[1] == key.shape[1]:
                spans = cache.spans_for(indices)
                if spans is not None:
                    out = _attend_documents(query, key, value, spans, cache)
                    return _flash_output(out, output_attentions, sequence_parallel)
            attention_mask = cache.mask_for(indices, query.dtype)
        by_attend = flash or (
            plain_eager
            and alibi is None
            and _eager_as_attend(query, config, output_attentions, args, kwargs)
        )
        if attention_mask is None or not by_attend:
            return original(
                query, config, key, value, attention_mask, output_attentions, *args, **kwargs
            )
        out = _attend(query, key, value, attention_mask)
        return _flash_output(out, output_attentions, sequence_parallel)

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
        GPU; on CPU at most that: one causal ``[n, n]`` mask per example length, or the
        expanded mask for indices that are not block-diagonal)."""
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
                else ", attended per example on CPU (no CPU FlashMask kernel; scores "
                "sum(n_i^2), not L^2)"
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
