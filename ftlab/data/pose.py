"""PoSE (positional skip-wise training; Zhu et al. 2023): a long context from short rows.

Each training sequence of ``n <= max_length`` tokens is split into two chunks at a random
point ``s`` (``1 <= s < n``); the second chunk's position ids skip ahead by a random ``u``
(``0 <= u <= context - n``):

    position_ids = [0, 1, ..., s - 1, s + u, s + u + 1, ..., n - 1 + u]

so over many rows the relative distances the model sees cover the whole target
``context`` (the scaled context of ``model.rope_scaling``), while each row still costs
``n`` positions of compute. The text is contiguous; only positions skip (PaddleNLP's
``use_pose_convert`` also drops the text between the chunks of one long document).
Every sequence of a packed row gets its own skip. The draws are seeded by the run seed
and the item's index, so a row always gets the same positions (also after a resume, and
whatever the data loader's worker count), as PaddleNLP converts each example once. The
dev split keeps plain positions: eval loss measures the model as it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle

CHUNKS = 2  # PoSE's default split, and what PaddleNLP's conversion uses


def pose_position_ids(n: int, context: int, rng: np.random.Generator) -> np.ndarray:
    """Positions for one sequence of ``n`` tokens skipping ahead inside ``context``."""
    if n < 2 or context <= n:
        return np.arange(n, dtype=np.int64)
    split = int(rng.integers(1, n))
    skip = int(rng.integers(0, context - n + 1))
    pos = np.arange(n, dtype=np.int64)
    pos[split:] += skip
    return pos


class PoseSkips:
    """Adds PoSE ``position_ids`` to dataset items (``key`` names the item: seeded draws)."""

    def __init__(self, context: int, seed: int) -> None:
        self.context = int(context)
        self.seed = int(seed)

    def positions(self, seq_lens: Sequence[int], key: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *key])
        return np.concatenate([pose_position_ids(int(n), self.context, rng) for n in seq_lens])

    def apply(self, item: dict[str, Any], key: Sequence[int]) -> dict[str, Any]:
        lens = item.get("seq_lens", [len(item["input_ids"])])
        return {**item, "position_ids": self.positions(lens, key)}


class PoseDataset(paddle.io.Dataset):
    """A map-style train dataset whose items carry PoSE position ids."""

    def __init__(self, inner: paddle.io.Dataset, skips: PoseSkips) -> None:
        super().__init__()
        self.inner = inner
        self.skips = skips

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.skips.apply(self.inner[i], (i,))

    def __getattr__(self, name: str) -> Any:  # packs, store, ... of the wrapped dataset
        if name in ("inner", "skips"):
            raise AttributeError(name)
        return getattr(self.inner, name)
