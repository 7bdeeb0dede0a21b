"""Batches in the layout PaddleNLP's Llama / Qwen2 forward reads.

Unpacked items -> ``input_ids``/``labels`` ``[B, L]`` (right padding with the pad token and
-100) and a 2-D ``attention_mask`` ``[B, L]`` (1 = token, 0 = padding); the model adds the
causal part itself.

Packed items (they carry ``seq_lens``) -> ``attention_mask`` ``[B, L, L]`` bool, True where
query row i may attend key column j: causal within each example, False across examples and
on padding (the same block-diagonal mask PaddleNLP's zero padding builds; the model turns a
3-D mask into ``[B, 1, L, L]``), and ``position_ids`` ``[B, L]`` restarting at 0 for each
example, so every example is computed as if it were alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftlab.data.examples import IGNORE


class Collator:
    """``collate_fn`` for the Trainer: a list of items -> a dict of numpy arrays."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)
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
        if not any("seq_lens" in it for it in items):
            mask = np.zeros((batch, width), dtype=np.int64)
            for b, it in enumerate(items):
                mask[b, : len(it["input_ids"])] = 1
            out["attention_mask"] = mask
            return out
        mask3 = np.zeros((batch, width, width), dtype=bool)
        position_ids = np.zeros((batch, width), dtype=np.int64)
        for b, it in enumerate(items):
            start = 0
            for n in it.get("seq_lens", [len(it["input_ids"])]):
                n = int(n)
                mask3[b, start : start + n, start : start + n] = self._causal(n)
                position_ids[b, start : start + n] = np.arange(n)
                start += n
        out["attention_mask"] = mask3
        out["position_ids"] = position_ids
        return out


def count_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(all positions, non-padding positions) of a collated batch (numpy or paddle)."""
    ids = batch["input_ids"]
    total = int(np.prod(ids.shape))
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
