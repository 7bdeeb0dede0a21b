"""In-memory datasets over an ``ExampleStore``: one item per example, or per pack."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

from ftlab.data.examples import ExampleStore
from ftlab.data.packing import concat_pack


class ExampleDataset(paddle.io.Dataset):
    """Item i: ``{"input_ids", "labels"}`` of example i (int32 arrays), plus ``seq_lens``
    for a text block whose documents are masked from each other."""

    def __init__(self, store: ExampleStore) -> None:
        super().__init__()
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.store[i].item()


class PackedDataset(paddle.io.Dataset):
    """Item i: pack i, ``{"input_ids", "labels", "seq_lens"}`` (see ``collate.Collator``)."""

    def __init__(self, store: ExampleStore, packs: list[list[int]]) -> None:
        super().__init__()
        self.store = store
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        parts = [self.store[j] for j in self.packs[i]]
        return concat_pack((p.input_ids, p.labels) for p in parts)

    def pack_lengths(self) -> np.ndarray:
        lengths = self.store.lengths()
        return np.asarray([int(lengths[p].sum()) for p in self.packs], dtype=np.int64)
