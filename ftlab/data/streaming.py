"""Streaming train data: files are read lazily, tokenized in batches, packed on the fly.

The stream is endless (pass after pass over the files, reshuffled per pass with
``seed + pass``) and training stops at ``train.max_steps``: every rank then runs the same
number of steps whatever its share of the data, and a resumed run can skip exactly the
items already consumed. Records are dealt round-robin to ``world_size * num_workers``
shards; each rank reads every line (so a bad record fails on all ranks alike) and
tokenizes only its own.

PaddleNLP's Trainer wraps an iterable dataset in ``IterableDatasetShard`` when its
dataset world size is > 1; a stream built with ``world_size > 1`` is already sharded and
must not be sharded again (see the report to the trainer's owner).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from ftlab.data.examples import Example, ExampleBuilder
from ftlab.data.formats import Conversation, to_conversation
from ftlab.data.packing import GREEDY_WINDOW, concat_pack, pack_window
from ftlab.data.pose import PoseSkips
from ftlab.data.records import BadRecords, iter_records
from ftlab.data.stats import SplitStats
from ftlab.data.text import DocumentBuilder
from ftlab.errors import DataError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2048  # conversations held for the streaming shuffle


def _plain_item(ex: Example) -> dict[str, Any]:
    return ex.item()


class StreamingDataset(paddle.io.IterableDataset):
    """Endless stream of examples (or packs) for one rank; see the module docstring."""

    def __init__(
        self,
        files: list[Path],
        fmt: str,
        builder: ExampleBuilder | DocumentBuilder,
        policy: str,
        packing: str,
        capacity: int,
        seed: int,
        shuffle: bool,
        world_size: int = 1,
        rank: int = 0,
        stats: SplitStats | None = None,
        pose: PoseSkips | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise DataError(f"streaming data: rank {rank} is outside world_size {world_size}.")
        self.files = list(files)
        self.fmt = fmt
        self.builder = builder
        self.policy = policy
        self.packing = packing
        self.capacity = capacity
        self.seed = seed
        self.shuffle = shuffle
        self.world_size = world_size
        self.rank = rank
        self.stats = stats if stats is not None else SplitStats(files=len(files))
        self.pose = pose
        self._skip = 0
        self._packed_tokens = 0

    def __len__(self) -> int:
        # paddle's IterableDataset raises RuntimeError here; TypeError is what len() callers
        # (and PaddleNLP's has_length) expect from an object without a length.
        raise TypeError("a streaming dataset has no length; training runs to train.max_steps")

    def skip_examples(self, n: int) -> None:
        """Skip the first ``n`` items this rank yields (examples, or packs when packing).

        An item is what the Trainer consumes (steps x per-device batch x accumulation), so
        a resumed run passes that count. Skipped items are still read and tokenized (the
        record-to-item mapping depends on drops and packing) but never collated or run.
        """
        if n < 0:
            raise DataError(f"streaming data: cannot skip a negative number of items ({n}).")
        self._skip = n

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = paddle.io.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers > 1 and self._skip:
            raise DataError(
                "streaming data: skipping consumed items for resume needs "
                "train.dataloader_num_workers=0 (with several workers the order in which "
                "their items are consumed is not fixed)."
            )
        shards, shard = self.world_size * workers, self.rank * workers + worker
        skip, epoch = self._skip, 0
        while True:
            self.stats.epochs_started = epoch + 1
            produced = 0
            for item in self._epoch(epoch, shards, shard):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                yield item if self.pose is None else self.pose.apply(item, (epoch, shard, produced))
            if produced == 0:
                raise DataError(
                    f"streaming data: a full pass over {len(self.files)} train file(s) gave no "
                    f"examples for shard {shard} of {shards} (rank {self.rank}); the split is "
                    "empty, all its records were skipped or dropped, or it has fewer records "
                    "than shards. Check the data or the skip counts in the data stats."
                )
            epoch += 1

    def _conversations(
        self, epoch: int, shards: int, shard: int
    ) -> Iterator[tuple[Conversation, str]]:
        files = self.files
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(files))
            files = [files[i] for i in order]
        bad = BadRecords(self.policy, self.stats)
        records = chain.from_iterable(iter_records(f, bad, self.stats) for f in files)
        for index, rec in enumerate(records):
            if index % shards != shard:
                continue
            conv = to_conversation(rec, self.fmt, bad)
            if conv is not None:
                yield conv, rec.where

    def _shuffled(
        self, items: Iterator[tuple[Conversation, str]], epoch: int, shard: int
    ) -> Iterator[tuple[Conversation, str]]:
        if not self.shuffle:
            yield from items
            return
        rng = np.random.default_rng([self.seed, epoch, shard, 1])
        buffer: list[tuple[Conversation, str]] = []
        for item in items:
            if len(buffer) < SHUFFLE_BUFFER:
                buffer.append(item)
                continue
            k = int(rng.integers(len(buffer)))
            yield buffer[k]
            buffer[k] = item
        rng.shuffle(buffer)
        yield from buffer

    def _epoch(self, epoch: int, shards: int, shard: int) -> Iterator[dict[str, Any]]:
        convs = self._shuffled(self._conversations(epoch, shards, shard), epoch, shard)
        bad = BadRecords(self.policy, self.stats)
        examples = self.builder.build(convs, self.stats, bad)
        # Text blocks leave the builder as final rows (``ftlab.data.text``).
        if self.packing == "none" or getattr(self.builder, "rows_are_final", False):
            return map(_plain_item, examples)
        if self.packing == "zero_padding":
            return self._pack_sequential(examples)
        return self._pack_greedy(examples)

    def _pack_sequential(self, examples: Iterator[Example]) -> Iterator[dict[str, Any]]:
        pack: list[Example] = []
        used = 0
        for ex in examples:
            if pack and used + len(ex.input_ids) > self.capacity:
                yield self._emit(pack)
                pack, used = [], 0
            pack.append(ex)
            used += len(ex.input_ids)
        if pack:
            yield self._emit(pack)

    def _pack_greedy(self, examples: Iterator[Example]) -> Iterator[dict[str, Any]]:
        window: list[Example] = []
        for ex in chain(examples, [None]):
            if ex is not None:
                window.append(ex)
            if window and (ex is None or len(window) == GREEDY_WINDOW):
                for pack in pack_window([len(e.input_ids) for e in window], self.capacity):
                    yield self._emit([window[i] for i in pack])
                window = []

    def _emit(self, pack: list[Example]) -> dict[str, Any]:
        self._packed_tokens += sum(len(e.input_ids) for e in pack)
        self.stats.set_packing((self.stats.packs or 0) + 1, self.capacity, self._packed_tokens)
        return concat_pack((e.input_ids, e.labels) for e in pack)
