"""One global batch, split over the data ranks exactly as a single process would see it.

Two things make a data-parallel (or sharded) run train on the same numbers as one process
with the same global batch:

* **Order.** ``GlobalBatchSampler`` draws one seeded permutation per epoch, cuts it into
  global micro-batches of ``per_device_batch * data_ranks`` examples, and gives rank r the
  r-th contiguous slice of each. A single process (one rank) gets the whole global batch in
  the same order. PaddleNLP's own samplers differ between the two cases (a ``BatchSampler``
  on one process, an epoch-seeded ``DistributedBatchSampler`` that pads the last batch with
  repeated examples on several), so runs were not comparable.
* **Normalisation.** The causal-LM loss is a mean over a batch's target tokens. Averaging
  per-rank means (what data parallelism does to losses and gradients) weights every rank
  equally, although ranks hold different numbers of target tokens; the result is not the
  mean over the global batch. ``global_token_scale`` rescales each rank's loss by
  ``tokens_on_rank * world / tokens_on_all_ranks`` so the average over ranks is the
  global-batch token mean, for the loss and for the gradients alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import paddle

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class GlobalBatchSampler(paddle.io.DistributedBatchSampler):
    """Rank ``rank``'s contiguous slice of each global micro-batch of a seeded epoch order.

    Subclasses Paddle's ``DistributedBatchSampler`` only so the Trainer calls
    ``set_epoch`` on it; its constructor is not used (it reads the launch environment).
    The last, partial global batch is split as evenly as possible (the first ranks take
    one extra example); when it has fewer examples than there are ranks it cannot be
    split and is left out of that epoch (logged).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside num_replicas {num_replicas}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.nranks = num_replicas
        self.local_rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._warned_tail = False

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.nranks

    def order(self) -> np.ndarray:
        """This epoch's order of example indices (the same on every rank)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def _tail(self, n: int) -> int:
        """Examples in the last, partial global batch that this epoch trains on."""
        tail = n % self.global_batch_size
        if self.drop_last or tail < self.nranks:
            return 0
        return tail

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch_size + (1 if self._tail(n) else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        n, g, b, r = len(order), self.global_batch_size, self.batch_size, self.local_rank
        full = n // g
        for k in range(full):
            start = k * g + r * b
            yield order[start : start + b].tolist()
        tail = n - full * g
        kept = self._tail(n)
        if tail and not kept and not self.drop_last and not self._warned_tail:
            log.warning(
                "the last %d example(s) of each epoch (dataset %d %% global batch %d) "
                "cannot be split over %d data ranks and are skipped",
                tail,
                n,
                g,
                self.nranks,
            )
            self._warned_tail = True
        if kept:
            base, extra = divmod(kept, self.nranks)
            start = full * g + r * base + min(r, extra)
            yield order[start : start + base + (1 if r < extra else 0)].tolist()


def target_tokens(labels: Any) -> int:
    """Positions that carry a target (label != -100) in a batch's labels."""
    if isinstance(labels, np.ndarray):
        return int((labels != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).astype("int64").sum())


def global_token_scale(labels: Any, world_size: int) -> float:
    """``tokens_here * world / tokens_everywhere``: the factor for this rank's mean loss."""
    return global_unit_scale(target_tokens(labels), world_size)


def global_unit_scale(here: int, world_size: int) -> float:
    """``units_here * world / units_everywhere`` for a loss that is a mean over ``here``
    units on this rank (target tokens; preference records for DPO and KTO).

    Ranks that share their data (tensor-parallel peers) count it once each on both sides
    of the ratio, so the factor is right for tensor parallelism too. Needs a collective:
    every rank must call it for every micro-batch.
    """
    import paddle.distributed as dist

    total = paddle.to_tensor([here], dtype="int64")
    dist.all_reduce(total)
    everywhere = int(total.item())
    if everywhere == 0:
        return 1.0  # no targets anywhere: every rank's loss is 0 already
    return here * world_size / everywhere
