"""``build_data``: from a ``DataConfig`` and a tokenizer to datasets, collator and stats."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from ftlab.config.schema import DataConfig
from ftlab.data.bundle import DataBundle
from ftlab.data.collate import Collator
from ftlab.data.datasets import ExampleDataset, PackedDataset
from ftlab.data.examples import ExampleBuilder, ExampleStore, Limits
from ftlab.data.formats import TEXT_FORMATS, detect_format, to_conversation
from ftlab.data.mixture import build_mixture
from ftlab.data.packing import make_packs, pack_order
from ftlab.data.pose import PoseDataset, PoseSkips
from ftlab.data.records import BadRecords, Record, iter_records, read_split, sha256_file
from ftlab.data.settings import check_data_settings, check_text_settings
from ftlab.data.splits import resolve_split_files
from ftlab.data.stats import DataStats, SplitStats
from ftlab.data.streaming import StreamingDataset
from ftlab.data.templates import make_renderer
from ftlab.data.text import DocumentBuilder, text_layout
from ftlab.errors import DataError

log = logging.getLogger(__name__)


def _check_tokenizer(tokenizer: Any) -> int:
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no eos token; examples "
            "need one to end each answer. Use a tokenizer with an eos token."
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise DataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no pad token; set "
            "model.pad_token (e.g. the unknown token) so batches can be padded."
        )
    return int(pad)


def _carve_dev(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """A seeded dev split of ``fraction`` of the (valid) train records."""
    n_dev = max(1, round(len(records) * fraction))
    if n_dev >= len(records):
        raise DataError(
            f"data.dev_from_train={fraction} leaves no train records out of "
            f"{len(records)}; lower it or add data."
        )
    order = np.random.default_rng(seed).permutation(len(records))
    dev_idx = set(order[:n_dev].tolist())
    train = [r for i, r in enumerate(records) if i not in dev_idx]
    dev = [records[i] for i in sorted(dev_idx)]
    return train, dev


def _valid(records: list[Record], fmt: str, bad: BadRecords) -> list[tuple[Record, Any]]:
    out = []
    for rec in records:
        conv = to_conversation(rec, fmt, bad)
        if conv is not None:
            out.append((rec, conv))
    return out


def _examples(
    builder: ExampleBuilder | DocumentBuilder,
    pairs: list[tuple[Record, Any]],
    stats: SplitStats,
    bad: BadRecords,
    split: str,
    files: list[Path],
) -> ExampleStore:
    store = ExampleStore(builder.build(((c, r.where) for r, c in pairs), stats, bad))
    if not len(store):
        raise DataError(
            f"the {split} split is empty: {', '.join(map(str, files))} gave no examples "
            f"({stats.records_read} records read, {sum(stats.skipped.values())} skipped, "
            f"{stats.dropped_overlong} dropped as overlong). Add records or fix the data."
        )
    return store


def _log_split(name: str, stats: SplitStats) -> None:
    log.info(
        "data %s: %d examples from %d records (%d skipped %s, %d prompts cut, %d answers "
        "cut, %d dropped overlong), %d tokens%s",
        name,
        stats.examples,
        stats.records_read,
        sum(stats.skipped.values()),
        dict(stats.skipped),
        stats.truncated_prompt,
        stats.truncated_target,
        stats.dropped_overlong,
        stats.tokens,
        f", {stats.packs} packs, efficiency {stats.packing_efficiency}"
        if stats.packs is not None
        else "",
    )
    for sample in stats.skipped_samples:
        log.warning("skipped: %s", sample)


def _train_map_dataset(
    cfg: DataConfig, store: ExampleStore, stats: SplitStats, seed: int, rows_are_final: bool
) -> paddle.io.Dataset:
    """One item per example, or per pack (examples seeded-shuffled first when data.shuffle).

    Text blocks are rows already (``rows_are_final``); their fill is reported like packs'.
    """
    if rows_are_final:
        stats.set_packing(len(store), cfg.max_length, stats.tokens)
        return ExampleDataset(store)
    if cfg.packing == "none":
        return ExampleDataset(store)
    n = len(store)
    order = pack_order(n, seed, cfg.shuffle)
    packs = make_packs(cfg.packing, store.lengths()[order].tolist(), cfg.max_length)
    packs = [[int(order[i]) for i in p] for p in packs]
    stats.set_packing(len(packs), cfg.max_length, stats.tokens)
    return PackedDataset(store, packs)


def _dev_pairs(
    cfg: DataConfig,
    dev_files: list[Path] | None,
    train_pairs: list[tuple[Record, Any]],
    fmt: str,
    seed: int,
    fingerprints: dict[str, str],
) -> tuple[list[tuple[Record, Any]], list[tuple[Record, Any]], SplitStats | None, str | None]:
    """(train pairs, dev pairs, dev stats, dev source): a dev file, or a carved-out share."""
    if dev_files is None and cfg.dev_from_train is None:
        return train_pairs, [], None, None
    stats = SplitStats()
    if dev_files is None:
        train_pairs, dev = _carve_dev(train_pairs, cfg.dev_from_train, seed)
        stats.records_read = len(dev)
        log.info(
            "data dev: %d records held out of train (data.dev_from_train=%s, seed %d)",
            len(dev),
            cfg.dev_from_train,
            seed,
        )
        return train_pairs, dev, stats, "dev_from_train"
    if cfg.dev_from_train is not None:
        log.warning(
            "data.dev_from_train=%s is ignored: a dev split exists (%s)",
            cfg.dev_from_train,
            ", ".join(map(str, dev_files)),
        )
    bad = BadRecords(cfg.on_bad_record, stats)
    dev = _valid(read_split(dev_files, bad, stats, fingerprints), fmt, bad)
    return train_pairs, dev, stats, "file"


def build_data(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int,
    need_dev: bool,
    max_steps: int | None = None,
    world_size: int = 1,
    rank: int = 0,
    flash_mask: bool = False,
    context_length: int | None = None,
) -> DataBundle:
    """Read, check, tokenize and (optionally) pack the data a run trains and evaluates on.

    Map-style datasets are not sharded here (the Trainer's sampler does it); a streaming
    train set is sharded by ``world_size``/``rank``. ``flash_mask``: packed batches carry
    FlashMask indices instead of dense masks (``model.flash_mask``); ``context_length``:
    the model's (scaled) context, which ``data.pose`` spreads position ids over.
    """
    check_data_settings(cfg, max_steps)
    if cfg.pose and context_length is None:
        raise DataError(
            "data.pose=true needs the model's context length (the positions PoSE skips "
            "into): pass context_length to build_data."
        )
    pose = PoseSkips(context_length, seed) if cfg.pose else None
    pad_id = _check_tokenizer(tokenizer)
    if cfg.sources:  # a weighted mixture: each source read as a dataset of its own
        return build_mixture(
            cfg,
            tokenizer,
            seed=seed,
            need_dev=need_dev,
            max_steps=max_steps,
            world_size=world_size,
            rank=rank,
            build_source=build_data,
            collate_fn=Collator(pad_id),
        )
    return _one_source(
        cfg,
        tokenizer,
        seed=seed,
        need_dev=need_dev,
        world_size=world_size,
        rank=rank,
        pose=pose,
        collate_fn=Collator(pad_id, flash_mask=flash_mask),
    )


def _one_source(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    seed: int,
    need_dev: bool,
    world_size: int,
    rank: int,
    pose: PoseSkips | None,
    collate_fn: Collator,
) -> DataBundle:
    """The data of one ``data.path``: its train split streamed or read whole, its dev split."""
    train_files, dev_files = _split_files(cfg, need_dev)
    fingerprints: dict[str, str] = {}
    train_stats = SplitStats()
    reading = _Reading(
        cfg, tokenizer, train_files, dev_files, train_stats, fingerprints, seed, pose
    )
    if cfg.streaming:
        fmt, builder, train_dataset, dev = _streaming_train(reading, world_size, rank)
    else:
        fmt, builder, train_dataset, dev = _in_memory_train(reading)
    dev_pairs, dev_stats, dev_source = dev
    dev_dataset = (
        None
        if dev_stats is None
        else _dev_dataset(
            cfg, tokenizer, fmt, builder, dev_pairs, dev_stats, dev_files or train_files
        )
    )
    stats = DataStats(
        format=fmt,
        chat_template=cfg.chat_template,
        packing=cfg.packing,
        max_length=cfg.max_length,
        streaming=cfg.streaming,
        dev_source=dev_source,
        train=train_stats,
        dev=dev_stats,
    )
    return DataBundle(
        train_dataset=train_dataset,
        dev_dataset=dev_dataset,
        collate_fn=collate_fn,
        dev_records=[r.data for r, _ in dev_pairs],
        format=fmt,
        stats=stats,
        fingerprints=fingerprints,
        builder=builder,
    )


def _split_files(cfg: DataConfig, need_dev: bool) -> tuple[list[Path], list[Path] | None]:
    """The train files and the dev files (None: no dev split on disk)."""
    train_files = resolve_split_files(cfg, "train")
    dev_files = resolve_split_files(cfg, "dev")
    if need_dev and dev_files is None and cfg.dev_from_train is None:
        raise DataError(
            f"a dev split is needed but data.path={cfg.path} has none: add dev.json (or a dev/ "
            "directory, or set data.dev_path), or set data.dev_from_train=0.05 to hold out 5% "
            "of the train records."
        )
    return train_files, dev_files


@dataclass
class _Reading:
    """What reading one source's splits needs, and where it counts what it read."""

    cfg: DataConfig
    tokenizer: Any
    files: list[Path]  # the train split's
    dev_files: list[Path] | None  # None: no dev split on disk
    stats: SplitStats  # the train split's
    fingerprints: dict[str, str]
    seed: int
    pose: PoseSkips | None


# A train split read: (format, builder, dataset, (dev pairs, dev stats, dev source)).
_DevPairs = tuple[list[tuple[Record, Any]], SplitStats | None, str | None]
_Train = tuple[str, ExampleBuilder | DocumentBuilder, Any, _DevPairs]


def _streaming_train(r: _Reading, world_size: int, rank: int) -> _Train:
    """A train split read lazily, sharded by rank (the format detected from its first
    records), and the dev split."""
    cfg, tokenizer, files, stats, seed = r.cfg, r.tokenizer, r.files, r.stats, r.seed
    fmt = detect_format(_first_records(files, cfg.on_bad_record), cfg.format)
    builder = _builder(cfg, tokenizer, fmt, train=True)
    for path in files:  # hashed up front: the stream itself reads lazily
        r.fingerprints[str(path.resolve())] = sha256_file(path)
    stats.files = len(files)
    dataset = StreamingDataset(
        files,
        fmt,
        builder,
        policy=cfg.on_bad_record,
        packing=cfg.packing,
        capacity=cfg.max_length,
        seed=seed,
        shuffle=cfg.shuffle,
        world_size=world_size,
        rank=rank,
        stats=stats,
        pose=r.pose,
    )
    _, dev_pairs, dev_stats, dev_source = _dev_pairs(
        cfg, r.dev_files, [], fmt, seed, r.fingerprints
    )
    return fmt, builder, dataset, (dev_pairs, dev_stats, dev_source)


def _in_memory_train(r: _Reading) -> _Train:
    """A train split read whole, and the dev split: a carved dev share leaves its records
    before they become examples."""
    cfg, files, stats, fingerprints, seed = r.cfg, r.files, r.stats, r.fingerprints, r.seed
    bad = BadRecords(cfg.on_bad_record, stats)
    records = read_split(files, bad, stats, fingerprints)
    if not records:
        raise DataError(
            f"the train split is empty: {', '.join(map(str, files))} "
            f"hold no readable records ({stats.records_read} read, "
            f"{sum(stats.skipped.values())} skipped). Add records."
        )
    fmt = detect_format(records, cfg.format)
    builder = _builder(cfg, r.tokenizer, fmt, train=True)
    pairs, dev_pairs, dev_stats, dev_source = _dev_pairs(
        cfg, r.dev_files, _valid(records, fmt, bad), fmt, seed, fingerprints
    )
    store = _examples(builder, pairs, stats, bad, "train", files)
    final = getattr(builder, "rows_are_final", False)
    dataset = _train_map_dataset(cfg, store, stats, seed, final)
    if r.pose is not None:
        dataset = PoseDataset(dataset, r.pose)
    _log_split("train", stats)
    return fmt, builder, dataset, (dev_pairs, dev_stats, dev_source)


def _dev_dataset(
    cfg: DataConfig,
    tokenizer: Any,
    fmt: str,
    builder: ExampleBuilder | DocumentBuilder,
    pairs: list[tuple[Record, Any]],
    stats: SplitStats,
    files: list[Path],
) -> ExampleDataset:
    """The dev examples, never packed (the eval loss does not depend on packing); text dev
    rows are one piece each."""
    dev_builder = builder
    if isinstance(builder, DocumentBuilder) and builder.layout != "pieces":
        dev_builder = _builder(cfg, tokenizer, fmt, train=False)
    store = _examples(dev_builder, pairs, stats, BadRecords(cfg.on_bad_record, stats), "dev", files)
    _log_split("dev", stats)
    return ExampleDataset(store)


def _builder(
    cfg: DataConfig, tokenizer: Any, fmt: str, train: bool
) -> ExampleBuilder | DocumentBuilder:
    """Instruction examples, or (text formats) document rows; dev text: one piece a row."""
    if fmt in TEXT_FORMATS:
        check_text_settings(cfg, fmt)  # also when the format was detected
        layout = text_layout(cfg.packing) if train else "pieces"
        return DocumentBuilder(tokenizer, cfg.max_length, layout)
    limits = Limits(cfg.src_length, cfg.max_length, cfg.overlong)
    return ExampleBuilder(tokenizer, make_renderer(cfg.chat_template, tokenizer), limits)


def _first_records(files: list[Path], policy: str, limit: int = 20) -> list[Record]:
    """The first records of a stream, for format detection (skips are not counted here)."""
    out: list[Record] = []
    scratch = SplitStats()
    for path in files:
        for rec in iter_records(path, BadRecords(policy, scratch), scratch):
            out.append(rec)
            if len(out) == limit:
                return out
    if not out:
        raise DataError(
            f"the train split is empty: {', '.join(map(str, files))} hold no "
            "readable records. Add records."
        )
    return out
