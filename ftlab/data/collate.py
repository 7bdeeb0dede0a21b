"""Batches in the layout PaddleNLP's Llama / Qwen2 forward reads.

Unpacked items -> ``input_ids``/``labels`` ``[B, L]`` (right padding with the pad token and
-100) and a 2-D ``attention_mask`` ``[B, L]`` (1 = token, 0 = padding); the model adds the
causal part itself.

Packed items (they carry ``seq_lens``) -> ``position_ids`` ``[B, L]`` restarting at 0 for
each example, so every example is computed as if it were alone, and its mask, one of:

* dense (default): ``attention_mask`` ``[B, L, L]`` bool, True where query row i may
  attend key column j: causal within each example, False across examples and on padding
  (the block-diagonal mask PaddleNLP's zero padding builds; the model turns a 3-D mask
  into ``[B, 1, L, L]``). O(L^2) per row: 64 MiB at L = 8192.
* FlashMask (``flash_mask=True``): ``attn_mask_startend_row_indices`` ``[B, 1, L]`` int32,
  per key column the first row that may no longer attend it: the end of its example, 0
  on padding (PaddleNLP's convention; ``ftlab.models.attention`` expands it on CPU). O(L)
  per row: 32 KiB at L = 8192.

Items may carry their own ``position_ids`` (PoSE skips positions); they are kept, and
padding gets position 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftlab.data.examples import IGNORE

FLASHMASK_KEY = "attn_mask_startend_row_indices"


class Collator:
    """``collate_fn`` for the Trainer: a list of items -> a dict of numpy arrays."""

    def __init__(self, pad_token_id: int, flash_mask: bool = False) -> None:
        self.pad_token_id = int(pad_token_id)
        self.flash_mask = bool(flash_mask)
        self._tri = np.tri(1, dtype=bool)

    def _causal(self, n: int) -> np.ndarray:
        if len(self._tri) < n:
            self._tri = np.tri(max(n, 2 * len(self._tri)), dtype=bool)
        return self._tri[:n, :n]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch, width = len(items), max(len(it["input_ids"]) for it in items)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((batch, width), IGNORE, dtype=np.int64)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
        out = {"input_ids": input_ids, "labels": labels}
        given_positions = any("position_ids" in it for it in items)
        if given_positions:
            out["position_ids"] = self._given_positions(items, width)
        if not any("seq_lens" in it for it in items):
            mask = np.zeros((batch, width), dtype=np.int64)
            for b, it in enumerate(items):
                mask[b, : len(it["input_ids"])] = 1
            out["attention_mask"] = mask
            return out
        if not given_positions:
            out["position_ids"] = self._restarting_positions(items, width)
        if self.flash_mask:
            out[FLASHMASK_KEY] = self._startend_row_indices(items, width)
        else:
            out["attention_mask"] = self._dense_mask(items, width)
        return out

    @staticmethod
    def _segments(item: dict[str, Any]) -> list[int]:
        return [int(n) for n in item.get("seq_lens", [len(item["input_ids"])])]

    def _dense_mask(self, items: list[dict[str, Any]], width: int) -> np.ndarray:
        mask3 = np.zeros((len(items), width, width), dtype=bool)
        for b, it in enumerate(items):
            start = 0
            for n in self._segments(it):
                mask3[b, start : start + n, start : start + n] = self._causal(n)
                start += n
        return mask3

    def _startend_row_indices(self, items: list[dict[str, Any]], width: int) -> np.ndarray:
        indices = np.zeros((len(items), 1, width), dtype=np.int32)
        for b, it in enumerate(items):
            start = 0
            for n in self._segments(it):
                indices[b, 0, start : start + n] = start + n
                start += n
        return indices

    def _restarting_positions(self, items: list[dict[str, Any]], width: int) -> np.ndarray:
        position_ids = np.zeros((len(items), width), dtype=np.int64)
        for b, it in enumerate(items):
            start = 0
            for n in self._segments(it):
                position_ids[b, start : start + n] = np.arange(n)
                start += n
        return position_ids

    @staticmethod
    def _given_positions(items: list[dict[str, Any]], width: int) -> np.ndarray:
        position_ids = np.zeros((len(items), width), dtype=np.int64)
        for b, it in enumerate(items):
            pos = it.get("position_ids")
            n = len(it["input_ids"])
            position_ids[b, :n] = np.arange(n) if pos is None else pos
        return position_ids


def count_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(all positions, non-padding positions) of a collated batch (numpy or paddle)."""
    ids = batch["input_ids"]
    total = int(np.prod(ids.shape))
    indices = batch.get(FLASHMASK_KEY)
    if indices is not None:  # a real column's start row lies past it; padding's is 0
        width = ids.shape[-1]
        if isinstance(indices, np.ndarray):
            return total, int((indices.reshape(-1, width) > np.arange(width)).sum())
        import paddle

        cols = paddle.arange(width, dtype=indices.dtype)
        return total, int((indices.reshape([-1, width]) > cols).astype("int64").sum())
    mask = batch.get("attention_mask")
    if mask is None:
        return total, total
    if isinstance(mask, np.ndarray):
        real = mask.sum() if mask.ndim == 2 else np.diagonal(mask, axis1=-2, axis2=-1).sum()
        return total, int(real)
    import paddle  # a batch the DataLoader already turned into tensors

    if mask.ndim == 2:
        return total, int(mask.astype("int64").sum())
    diag = paddle.diagonal(mask.astype("int32"), axis1=-2, axis2=-1)
    return total, int(diag.astype("int64").sum())
