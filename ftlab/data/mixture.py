"""Weighted data mixtures (``data.sources``): several datasets interleaved by weight.

Each source is read by the ordinary single-dataset pipeline (``build_data`` with the
source's own path, format detection, chat template and bad-record policy, unpacked), so
every rule, count and error message of a dataset holds per source. The mixture then
decides which examples train and in what order:

* **How many from each.** A mixture epoch has as many examples as the sources hold
  together (``N``); source i fills ``round(N * w_i)`` of them (largest remainder), cycling
  through its examples (reshuffled each pass with the seed) when its weight asks for more
  than it has, and using a seeded subset when it asks for fewer.
* **In what order.** ``interleave`` deals the slots: at every position the source
  furthest behind its share goes next (ties broken by a seeded draw), so every prefix of
  the mixture is within one example per source of the requested shares. A map-style epoch
  is then shuffled by the Trainer's sampler like any dataset (``data.shuffle``); a stream
  is consumed in dealt order.
* **Packing** happens after mixing (examples of different sources share packs).

The same seed gives the same examples in the same order. Per source the summary reports
what it held (records, examples, skips, cuts), what the mixture drew (examples, tokens
after truncation, realised share against the requested weight), a fingerprint over its
files, and, when it has a dev split, its own eval loss after training.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import paddle

from ftlab.config.schema import DataConfig
from ftlab.data.bundle import DataBundle
from ftlab.data.datasets import ExampleDataset, PackedDataset
from ftlab.data.examples import IGNORE, Example, ExampleStore
from ftlab.data.packing import make_packs
from ftlab.data.settings import mixture_weights, source_config, source_name
from ftlab.data.stats import DataStats, SourceStats, SplitStats
from ftlab.data.streaming import StreamingDataset
from ftlab.errors import DataError

log = logging.getLogger(__name__)


def interleave(weights: Sequence[float], seed: int) -> Iterator[int]:
    """Endless source indices, each source as close to its share as a prefix allows.

    At position k (1-based) the source with the largest deficit ``w_i * k - drawn_i``
    goes next; ties are broken by a draw from ``seed``. After k draws every source has
    drawn ``w_i * k`` rounded one way or the other.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.all(w > 0):
        raise DataError(f"mixture weights {list(weights)} must be positive numbers")
    w = w / w.sum()
    drawn = np.zeros(len(w))
    rng = np.random.default_rng([seed, 17])
    k = 0
    while True:
        k += 1
        deficit = w * k - drawn
        best = np.flatnonzero(deficit >= deficit.max() - 1e-9)
        i = int(best[0] if len(best) == 1 else best[rng.integers(len(best))])
        drawn[i] += 1
        yield i


def deal(weights: Sequence[float], n: int, seed: int) -> np.ndarray:
    """The first ``n`` indices of ``interleave``."""
    out = np.empty(n, dtype=np.int64)
    it = interleave(weights, seed)
    for k in range(n):
        out[k] = next(it)
    return out


def _cycled(size: int, count: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    """``count`` indices into ``size`` examples: whole passes, reshuffled per pass."""
    passes = -(-count // size)
    orders = [rng.permutation(size) if shuffle else np.arange(size) for _ in range(passes)]
    return np.concatenate(orders)[:count]


def concat_stores(stores: Sequence[ExampleStore]) -> tuple[ExampleStore, np.ndarray]:
    """One store holding every example of ``stores``; and where each store starts in it."""
    out = ExampleStore()
    out.ids = np.concatenate([s.ids for s in stores])
    out.labels = np.concatenate([s.labels for s in stores])
    offsets, base = [np.zeros(1, np.int64)], 0
    for s in stores:
        offsets.append(s.offsets[1:] + base)
        base += int(s.offsets[-1])
    out.offsets = np.concatenate(offsets)
    starts = np.cumsum([0, *(len(s) for s in stores)])[:-1]
    return out, starts


class MixtureDataset(paddle.io.Dataset):
    """Item i: example ``indices[i]`` of the combined store (unpacked)."""

    def __init__(self, store: ExampleStore, indices: np.ndarray) -> None:
        super().__init__()
        self.store = store
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.store[int(self.indices[i])]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class MixtureStream(StreamingDataset):
    """Endless stream dealing examples from the sources' own streams by weight, then
    packing them (``StreamingDataset``'s packing and resume skipping, reused)."""

    def __init__(
        self,
        streams: list[StreamingDataset],
        sources: list[SourceStats],
        cfg: DataConfig,
        seed: int,
        stats: SplitStats,
    ) -> None:
        super().__init__(
            [f for s in streams for f in s.files],
            "mixture",
            streams[0].builder,
            policy=cfg.on_bad_record,
            packing=cfg.packing,
            capacity=cfg.max_length,
            seed=seed,
            shuffle=False,
            stats=stats,
        )
        self.streams = streams
        self.sources = sources

    def _epoch(self, epoch: int, shards: int, shard: int) -> Iterator[dict[str, Any]]:
        # One endless "epoch": each source stream runs its own passes (and shards itself).
        iters = [iter(s) for s in self.streams]

        def examples() -> Iterator[Example]:
            for i in interleave([s.weight for s in self.sources], self.seed):
                item = next(iters[i])
                ex = Example(item["input_ids"], item["labels"])
                n_target = int(np.count_nonzero(ex.labels != IGNORE))
                self.sources[i].draw(len(ex.input_ids), n_target)
                self.stats.count_example(len(ex.input_ids), n_target)
                yield ex

        if self.packing == "none":
            return ({"input_ids": e.input_ids, "labels": e.labels} for e in examples())
        if self.packing == "zero_padding":
            return self._pack_sequential(examples())
        return self._pack_greedy(examples())


def _fingerprint(fingerprints: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(fingerprints):
        digest.update(f"{fingerprints[path]}  {path}\n".encode())
    return digest.hexdigest()


def _sum_splits(splits: Sequence[SplitStats]) -> SplitStats:
    """Reading counts of several splits added up (examples and tokens are set by the
    caller: a mixture's are what it draws, not what its sources hold)."""
    out = SplitStats()
    for s in splits:
        out.files += s.files
        out.records_read += s.records_read
        out.blank_lines += s.blank_lines
        out.skipped.update(s.skipped)
        out.skipped_samples += s.skipped_samples[: 5 - len(out.skipped_samples)]
        out.truncated_prompt += s.truncated_prompt
        out.truncated_target += s.truncated_target
        out.dropped_overlong += s.dropped_overlong
    return out


def build_mixture(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int,
    need_dev: bool,
    max_steps: int | None,
    world_size: int,
    rank: int,
    build_source: Callable[..., DataBundle],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]],
) -> DataBundle:
    """The mixture of ``cfg.sources`` as one ``DataBundle`` (see the module docstring).

    ``build_source`` is ``build_data`` (passed in: it calls this module, not the reverse).
    """
    read = functools.partial(
        build_source,
        tokenizer=tokenizer,
        seed=seed,
        need_dev=False,  # a dev split is needed of the mixture, not of every source
        max_steps=max_steps,
        world_size=world_size,
        rank=rank,
    )
    parts = _build_sources(cfg, read, need_dev)
    sources = _source_stats(cfg, parts)
    train_stats = _sum_splits([p.stats.train for p in parts.values()])
    if cfg.streaming:
        train_dataset: Any = MixtureStream(
            [p.train_dataset for p in parts.values()], sources, cfg, seed, train_stats
        )
    else:
        train_dataset = _mixed_epoch(cfg, parts, sources, seed, train_stats)
    dev_dataset, dev_stats = _mixed_dev(parts)
    fingerprints = {k: v for p in parts.values() for k, v in p.fingerprints.items()}
    stats = DataStats(
        format="mixture",
        chat_template=cfg.chat_template,
        packing=cfg.packing,
        max_length=cfg.max_length,
        streaming=cfg.streaming,
        dev_source="sources" if dev_dataset is not None else None,
        train=train_stats,
        dev=dev_stats,
        sources=sources,
    )
    shares = ", ".join(f"{s.name} {s.weight:.3f}" for s in sources)
    log.info("data mixture of %d sources (weights %s), seed %d", len(sources), shares, seed)
    return DataBundle(
        train_dataset=train_dataset,
        dev_dataset=dev_dataset,
        collate_fn=collate_fn,
        dev_records=[r for p in parts.values() for r in p.dev_records],
        format="mixture",
        stats=stats,
        fingerprints=fingerprints,
        builder=None,
        parts=parts,
    )


def _build_sources(
    cfg: DataConfig, read: Callable[[DataConfig], DataBundle], need_dev: bool
) -> dict[str, DataBundle]:
    """Each source read (``read``) as a dataset of its own, by name; its errors name the
    source."""
    parts: dict[str, DataBundle] = {}
    for src in cfg.sources:
        name = source_name(src)
        try:
            parts[name] = read(source_config(cfg, src))
        except DataError as err:
            raise DataError(f"data.sources[{name}]: {err}") from None
    if need_dev and all(p.dev_dataset is None for p in parts.values()):
        raise DataError(
            "a dev split is needed but no source of data.sources has one: add dev.json to a "
            "source's directory, or set data.dev_from_train=0.05 to hold out 5% of each "
            "source's train records."
        )
    return parts


def _source_stats(cfg: DataConfig, parts: dict[str, DataBundle]) -> list[SourceStats]:
    """Each source's record in the mixture's stats: where it came from, its weight, its
    fingerprint and what it read (what was drawn from it is filled in later)."""
    weights = mixture_weights(cfg) or {}
    return [
        SourceStats(
            name=name,
            path=src.path,
            format=part.format,
            chat_template=part.stats.chat_template,
            on_bad_record=src.on_bad_record or cfg.on_bad_record,
            weight=weights[name],
            fingerprint=_fingerprint(part.fingerprints),
            split=part.stats.train,
            dev_examples=part.stats.dev.examples if part.stats.dev is not None else None,
        )
        for (name, part), src in zip(parts.items(), cfg.sources, strict=True)
    ]


def _mixed_epoch(
    cfg: DataConfig,
    parts: dict[str, DataBundle],
    sources: list[SourceStats],
    seed: int,
    stats: SplitStats,
) -> paddle.io.Dataset:
    stores = [p.train_dataset.store for p in parts.values()]
    store, starts = concat_stores(stores)
    n = len(store)
    which = deal([s.weight for s in sources], n, seed)
    indices = np.empty(n, dtype=np.int64)
    all_lengths = store.lengths()
    targets = np.add.reduceat((store.labels != IGNORE).astype(np.int64), store.offsets[:-1])
    for i, (src_store, start) in enumerate(zip(stores, starts, strict=True)):
        slots = np.flatnonzero(which == i)
        rng = np.random.default_rng([seed, 31, i])
        indices[slots] = start + _cycled(len(src_store), len(slots), rng, cfg.shuffle)
        sources[i].drawn = len(slots)
        sources[i].drawn_tokens = int(all_lengths[indices[slots]].sum())
        sources[i].drawn_target_tokens = int(targets[indices[slots]].sum())
        if len(slots) > len(src_store):
            log.info(
                "data mixture: source %s repeats its %d examples %.2f times (weight %.3f)",
                sources[i].name,
                len(src_store),
                len(slots) / len(src_store),
                sources[i].weight,
            )
    lengths = all_lengths[indices]
    stats.examples = n
    stats.tokens = int(lengths.sum())
    stats.target_tokens = sum(s.drawn_target_tokens for s in sources)
    stats.max_tokens = int(lengths.max()) if n else 0
    if cfg.packing == "none":
        return MixtureDataset(store, indices)
    packs = [
        [int(indices[p]) for p in pack] for pack in make_packs(cfg.packing, lengths, cfg.max_length)
    ]
    stats.set_packing(len(packs), cfg.max_length, stats.tokens)
    return PackedDataset(store, packs)


def _mixed_dev(parts: dict[str, DataBundle]) -> tuple[paddle.io.Dataset | None, SplitStats | None]:
    """Every source's dev examples together (the overall eval loss); None without any."""
    devs = [p for p in parts.values() if p.dev_dataset is not None]
    if not devs:
        return None, None
    store, _ = concat_stores([p.dev_dataset.store for p in devs])
    stats = _sum_splits([p.stats.dev for p in devs])
    for p in devs:
        d = p.stats.dev
        stats.examples += d.examples
        stats.tokens += d.tokens
        stats.target_tokens += d.target_tokens
        stats.max_tokens = max(stats.max_tokens, d.max_tokens)
    return ExampleDataset(store), stats
