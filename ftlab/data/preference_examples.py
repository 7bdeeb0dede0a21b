"""Preference records -> training rows in the layout PaddleNLP's DPO and KTO criteria read.

One row holds a prompt and two responses that share it (PaddleNLP's preference layout,
``paddlenlp.trl.trl_data``): ``prompt[:-1] + [p] + first[:-1] + [p] + second[:-1]`` where
``p`` is the prompt's last token, repeated so that each response segment starts with the
position that predicts its first token. Labels are not shifted (PaddleNLP's causal-LM
convention): segment positions carry the response's tokens. Position ids restart at the
prompt length for the second segment, and the attention mask is causal except that the
second segment cannot see the first, so each response is computed exactly as if it
followed the prompt alone (tested against separate forward passes).

* DPO and its variants: first = chosen, second = rejected (``chosen_labels``,
  ``rejected_labels``, ``response_indexs`` rows ``[row, start, middle, end]``).
* KTO: first = the completion, second = another record's completion for the same prompt
  (the KL term's mismatched pair; record i takes record i+1's, cyclically within the
  split), ``response_labels``, ``response_kl_labels``, rows ``[row, start, middle, end,
  desirable]``. Pairs given to KTO become one desirable and one undesirable completion.

Truncation (counted, as for SFT): the prompt keeps its last ``data.src_length`` tokens
(the bos stays); the responses are cut from the right so the row fits ``data.max_length``:
the shorter keeps all of its tokens when it fits in half of the room, the longer gets the
rest. A cut response gets no end-of-turn token. ``data.overlong=drop|error`` applies to a
record that needed a cut of its prompt or its responses (a KTO KL completion is cut to fit
without that: it is not trained on, only scored).

Written here rather than taken from ``paddlenlp.trl.preprocess_preference_data`` because
that function ignores chat templates (``run_dpo.py`` sets ``tokenizer.chat_template =
None``), encodes one text at a time, cuts both responses proportionally, counts nothing,
and its collator expects PaddleNLP's zero-padding dataset items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from ftlab.config.schema import DataConfig
from ftlab.data.build import _carve_dev, _check_tokenizer, _log_split
from ftlab.data.bundle import DataBundle
from ftlab.data.encoder import TextEncoder, leading_ids
from ftlab.data.examples import ENCODE_BATCH, Example, ExampleStore
from ftlab.data.packing import make_packs, pack_order
from ftlab.data.preference import (
    LABELLED,
    PAIRWISE,
    LabelledCompletion,
    Parsed,
    PreferencePair,
    Prompt,
    detect_preference_format,
    parse_preference,
)
from ftlab.data.records import BadRecords, Record, read_split
from ftlab.data.settings import check_data_settings
from ftlab.data.splits import resolve_split_files
from ftlab.data.stats import DataStats, SplitStats
from ftlab.data.templates import Renderer, make_renderer
from ftlab.errors import DataError

log = logging.getLogger(__name__)

NO_LABEL = 0  # PaddleNLP's preference criteria treat label 0 as "no target here"


@dataclass
class PreferenceSplitStats(SplitStats):
    """SplitStats plus what only preference data has (``examples`` counts rows)."""

    pairs_split: int = 0  # KTO: pairs turned into a desirable and an undesirable completion
    desirable: int = 0  # KTO rows whose completion is desirable
    undesirable: int = 0
    kl_truncated: int = 0  # KTO: KL completions cut to fit the row (not trained on)


@dataclass(frozen=True)
class Segments:
    """One record, tokenized: the prompt and the two responses of its row."""

    prompt: list[int]
    first: list[int]  # targets: chosen (DPO) or the completion (KTO)
    second: list[int]  # targets: rejected (DPO) or the KL completion (KTO)
    label: int  # KTO: 1 desirable, 0 undesirable; DPO: -1
    where: str
    head: int  # leading prompt tokens a cut keeps (1: the bos)


class PreferenceEncoder:
    """Renders prompts and responses with the chat template and tokenizes them in batches."""

    def __init__(self, tokenizer: Any, renderer: Renderer, encoder: TextEncoder | None = None):
        self.renderer = renderer
        self.encoder = encoder or TextEncoder(tokenizer)
        self.head = leading_ids(tokenizer) if renderer.add_bos else []
        self.eos = tokenizer.eos_token_id

    def _pieces(self, prompt: Prompt, answer: str, where: str) -> tuple[list[Any], str]:
        try:
            pieces = self.renderer.pieces(prompt.answered_by(answer))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        return pieces[:-1], pieces[-1].text

    def encode(
        self, items: list[tuple[Prompt, list[str], str]]
    ) -> list[tuple[list[int], list[list[int]]]]:
        """(prompt ids, target ids per answer) for (prompt, answers, location) items."""
        texts: list[str] = []
        layout: list[tuple[list[bool], int]] = []
        for prompt, answers, where in items:
            head, first = self._pieces(prompt, answers[0], where)
            tails = [first]
            for answer in answers[1:]:
                other_head, tail = self._pieces(prompt, answer, where)
                if [(p.text, p.target) for p in other_head] != [(p.text, p.target) for p in head]:
                    raise DataError(
                        f"{where}: data.chat_template={self.renderer.name} renders the prompt "
                        "differently for the two responses; use a named template or null."
                    )
                tails.append(tail)
            texts += [p.text for p in head] + tails
            layout.append(([p.target for p in head], len(tails)))
        encoded = self.encoder.encode(texts)
        out, pos = [], 0
        for flags, n_answers in layout:
            prompt_ids = list(self.head)
            for is_target in flags:
                prompt_ids += encoded[pos]
                if is_target and self.renderer.eos_after_target:
                    prompt_ids.append(self.eos)  # an earlier answer, ended as in SFT
                pos += 1
            targets = []
            for _ in range(n_answers):
                ids = list(encoded[pos])
                targets.append(ids + [self.eos] if self.renderer.eos_after_target else ids)
                pos += 1
            out.append((prompt_ids, targets))
        return out


def split_budget(first: int, second: int, budget: int) -> tuple[int, int]:
    """Tokens kept of two responses sharing ``budget`` (see the module docstring)."""
    if first + second <= budget:
        return first, second
    keep_first = min(first, max(budget // 2, budget - second))
    return keep_first, min(second, budget - keep_first)


@dataclass(frozen=True)
class Limits:
    src_length: int
    max_length: int
    overlong: str


Row = tuple[Example, tuple[int, int, int, int]]


def assemble(
    seg: Segments, limits: Limits, stats: PreferenceSplitStats, bad: BadRecords, kto: bool
) -> Row | None:
    """The row of one record (``Example.labels`` holds its targets) and its bounds
    ``(start, middle, end, label)``; None when dropped or skipped (counted)."""
    prompt = seg.prompt
    cut_prompt = len(prompt) > limits.src_length
    if cut_prompt:
        prompt = prompt[: seg.head] + prompt[len(prompt) - (limits.src_length - seg.head) :]
    if len(prompt) <= seg.head:
        bad.reject("empty_prompt", f"{seg.where}: empty prompt: it encodes to no tokens")
        return None
    if not seg.first or not seg.second:
        bad.reject("empty_response", f"{seg.where}: empty response: it encodes to no tokens")
        return None
    budget = limits.max_length - (len(prompt) - 1)
    keep_a, keep_b = split_budget(len(seg.first), len(seg.second), budget)
    cut_a, cut_b = keep_a < len(seg.first), keep_b < len(seg.second)
    policed = cut_prompt or cut_a or (cut_b and not kto)
    if policed and limits.overlong != "truncate":
        if limits.overlong == "error":
            raise DataError(
                f"{seg.where}: preference record is too long: prompt {len(seg.prompt)} + "
                f"responses {len(seg.first)} and {len(seg.second)} tokens, limits "
                f"data.src_length={limits.src_length} for the prompt and "
                f"data.max_length={limits.max_length} for the row. Raise the limits or set "
                "data.overlong=truncate or data.overlong=drop."
            )
        stats.dropped_overlong += 1
        return None
    stats.truncated_prompt += cut_prompt
    stats.truncated_target += cut_a or (cut_b and not kto)
    stats.kl_truncated += cut_b and kto
    a, b = seg.first[:keep_a], seg.second[:keep_b]
    row = prompt + a[:-1] + [prompt[-1]] + b[:-1]
    targets = [NO_LABEL] * (len(prompt) - 1) + a + b
    start = len(prompt) - 1
    stats.count_example(len(row), len(a) + (0 if kto else len(b)))
    if kto:
        stats.desirable += seg.label == 1
        stats.undesirable += seg.label == 0
    example = Example(np.asarray(row, np.int32), np.asarray(targets, np.int32))
    return example, (start, start + len(a), start + len(a) + len(b), seg.label)


class PreferenceStore:
    """Rows (ids + targets) and, per row, its segment bounds and label."""

    def __init__(self, rows: list[Row]) -> None:
        self.store = ExampleStore(ex for ex, _ in rows)
        self.bounds = np.asarray([b for _, b in rows], dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.store)

    def lengths(self) -> np.ndarray:
        return self.store.lengths()

    def item(self, indices: list[int]) -> dict[str, np.ndarray]:
        parts = [self.store[i] for i in indices]
        offsets = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
        bounds = self.bounds[indices].copy()
        bounds[:, :3] += offsets[:, None]
        return {
            "input_ids": np.concatenate([p.input_ids for p in parts]),
            "targets": np.concatenate([p.labels for p in parts]),
            "starts": offsets.astype(np.int64),  # where each record's row begins
            "bounds": bounds,  # [start, middle, end, label] per record, within the item
        }


class PreferenceDataset(paddle.io.Dataset):
    """Item i: one record's row, or a pack of rows (``packs``)."""

    def __init__(self, store: PreferenceStore, packs: list[list[int]] | None = None) -> None:
        super().__init__()
        self.store = store
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else len(self.store)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.store.item(self.packs[i] if self.packs is not None else [i])


class PreferenceCollator:
    """Items -> the batch PaddleNLP's ``DPOTrainer`` (``kind=pairwise``) or ``KTOTrainer``
    (``kind=labelled``) reads: ids, position ids, a ``[B, L, L]`` bool mask, the two label
    rows and ``response_indexs``."""

    def __init__(self, pad_token_id: int, kind: str) -> None:
        self.pad_token_id = int(pad_token_id)
        self.kind = kind

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch, width = len(items), max(len(it["input_ids"]) for it in items)
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        position_ids = np.zeros((batch, width), dtype=np.int64)
        first = np.full((batch, width), NO_LABEL, dtype=np.int64)
        second = np.full((batch, width), NO_LABEL, dtype=np.int64)
        mask = np.zeros((batch, width, width), dtype=bool)
        indexes = []
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            ends = list(it["starts"][1:]) + [n]
            for row_start, row_end, (s1, s2, e, label) in zip(
                it["starts"], ends, it["bounds"], strict=True
            ):
                assert e == row_end, (e, row_end)
                size = row_end - row_start
                mask[b, row_start:row_end, row_start:row_end] = np.tri(size, dtype=bool)
                mask[b, s2:e, s1:s2] = False  # the second response never sees the first
                prompt_len = s1 - row_start
                position_ids[b, row_start:s1] = np.arange(prompt_len)
                position_ids[b, s1:s2] = np.arange(prompt_len, prompt_len + s2 - s1)
                position_ids[b, s2:e] = np.arange(prompt_len, prompt_len + e - s2)
                first[b, s1:s2] = it["targets"][s1:s2]
                second[b, s2:e] = it["targets"][s2:e]
                indexes.append([b, s1, s2, e] + ([label] if self.kind == LABELLED else []))
        out = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            "response_indexs": np.asarray(indexes, dtype=np.int64),
        }
        names = (
            ("chosen_labels", "rejected_labels")
            if self.kind == PAIRWISE
            else ("response_labels", "response_kl_labels")
        )
        out[names[0]], out[names[1]] = first, second
        return out


def count_records(batch: dict[str, Any]) -> int:
    """Preference records (pairs, or labelled completions) in a collated batch."""
    return int(batch["response_indexs"].shape[0])


# --------------------------------------------------------------------------- build


def _units(
    parsed: list[tuple[Record, Parsed]], kind: str, stats: PreferenceSplitStats
) -> list[tuple[Record, Prompt, list[str], int]]:
    """(record, prompt, answers, label) per row: pairs for DPO; completions for KTO."""
    out = []
    for rec, p in parsed:
        if kind == PAIRWISE:
            if isinstance(p, LabelledCompletion):
                raise DataError(
                    f"{rec.where}: a labelled completion (one response marked desirable or "
                    "not) in data for a pairwise stage: DPO and its variants compare a chosen "
                    "and a rejected response. Use stage=kto for labelled data."
                )
            out.append((rec, p.prompt, [p.chosen, p.rejected], -1))
        elif isinstance(p, PreferencePair):
            stats.pairs_split += 1
            out.append((rec, p.prompt, [p.chosen], 1))
            out.append((rec, p.prompt, [p.rejected], 0))
        else:
            out.append((rec, p.prompt, [p.completion], int(p.desirable)))
    return out


def encode_split(
    parsed: list[tuple[Record, Parsed]],
    encoder: PreferenceEncoder,
    limits: Limits,
    kind: str,
    stats: PreferenceSplitStats,
    bad: BadRecords,
) -> PreferenceStore:
    units = _units(parsed, kind, stats)
    encoded: list[tuple[list[int], list[list[int]]]] = []
    for start in range(0, len(units), ENCODE_BATCH):
        chunk = units[start : start + ENCODE_BATCH]
        encoded += encoder.encode([(p, answers, r.where) for r, p, answers, _ in chunk])
    segments = []
    for i, ((rec, _, _, label), (prompt, targets)) in enumerate(zip(units, encoded, strict=True)):
        if kind == PAIRWISE:
            second = targets[1]
        else:  # the KL term: the next row's completion answers this prompt
            second = encoded[(i + 1) % len(encoded)][1][0]
        head = len(encoder.head)
        segments.append(Segments(prompt, targets[0], second, label, rec.where, head))
    rows = []
    for seg in segments:
        out = assemble(seg, limits, stats, bad, kto=kind == LABELLED)
        if out is not None:
            rows.append(out)
    return PreferenceStore(rows)


def _parse(records: list[Record], fmt: str, bad: BadRecords) -> list[tuple[Record, Parsed]]:
    out = []
    for rec in records:
        parsed = parse_preference(rec, fmt, bad)
        if parsed is not None:
            out.append((rec, parsed))
    return out


def _dev_entities(parsed: list[tuple[Record, Parsed]]) -> list[dict[str, Any]]:
    """Dev records for the task metric: the user message as ``src``, plus the record's keys."""
    return [{**rec.data, "src": p.prompt.user} for rec, p in parsed]


def _check_kto_balance(stats: PreferenceSplitStats, rows: int) -> None:
    """KTO contrasts desirable with undesirable completions and takes each row's KL term
    from another record: without both kinds, or with one row, it trains on nothing it can
    contrast (``rewards/rejected`` stays 0.000)."""
    if rows < 2 or not stats.desirable or not stats.undesirable:
        raise DataError(
            f"stage=kto: the train split has {stats.desirable} desirable and "
            f"{stats.undesirable} undesirable completions in {rows} rows; KTO needs both "
            "kinds (and at least two rows: each row's KL term comes from another record's "
            "completion). Add the missing kind, or use stage=sft on the desirable ones."
        )


def build_preference_data(
    cfg: DataConfig, tokenizer: Any, *, kind: str, seed: int, need_dev: bool
) -> DataBundle:
    """Read, check, tokenize and (optionally) pack preference data (``kind``: pairwise for
    DPO and its variants, labelled for KTO)."""
    check_data_settings(cfg, None)
    if cfg.streaming:
        raise DataError(
            "data.streaming=true: preference data is read into memory (a KTO row pairs each "
            "completion with another record's). Set data.streaming=false."
        )
    pad_id = _check_tokenizer(tokenizer)
    train_files = resolve_split_files(cfg, "train")
    dev_files = resolve_split_files(cfg, "dev")
    if need_dev and dev_files is None and cfg.dev_from_train is None:
        raise DataError(
            f"a dev split is needed but data.path={cfg.path} has none: add dev.json (or set "
            "data.dev_path), or set data.dev_from_train=0.05 to hold out 5% of the train records."
        )
    limits = Limits(cfg.src_length, cfg.max_length, cfg.overlong)
    encoder = PreferenceEncoder(tokenizer, make_renderer(cfg.chat_template, tokenizer))
    fingerprints: dict[str, str] = {}
    train_stats = PreferenceSplitStats()
    train_bad = BadRecords(cfg.on_bad_record, train_stats)
    records = read_split(train_files, train_bad, train_stats, fingerprints)
    if not records:
        raise DataError(
            f"the train split is empty: {', '.join(map(str, train_files))} hold no readable "
            "records. Add records."
        )
    fmt = detect_preference_format(records, cfg.format)
    train = _parse(records, fmt, train_bad)
    dev: list[tuple[Record, Parsed]] = []
    dev_stats: PreferenceSplitStats | None = None
    dev_source = None
    if dev_files is not None:
        dev_stats = PreferenceSplitStats()
        dev_bad = BadRecords(cfg.on_bad_record, dev_stats)
        dev = _parse(read_split(dev_files, dev_bad, dev_stats, fingerprints), fmt, dev_bad)
        dev_source = "file"
    elif cfg.dev_from_train is not None:
        train, dev = _carve_dev(train, cfg.dev_from_train, seed)
        dev_stats = PreferenceSplitStats(records_read=len(dev))
        dev_source = "dev_from_train"

    store = _nonempty(
        encode_split(train, encoder, limits, kind, train_stats, train_bad), "train", train_stats
    )
    if kind == LABELLED:
        _check_kto_balance(train_stats, len(store))
    packs = None
    if cfg.packing != "none":
        n = len(store)
        order = pack_order(n, seed, cfg.shuffle)
        packs = make_packs(cfg.packing, store.lengths()[order].tolist(), cfg.max_length)
        packs = [[int(order[i]) for i in p] for p in packs]
        train_stats.set_packing(len(packs), cfg.max_length, train_stats.tokens)
    _log_split("train", train_stats)
    dev_dataset = None
    if dev_stats is not None:
        dev_bad = BadRecords(cfg.on_bad_record, dev_stats)
        dev_store = _nonempty(
            encode_split(dev, encoder, limits, kind, dev_stats, dev_bad), "dev", dev_stats
        )
        dev_dataset = PreferenceDataset(dev_store)  # never packed
        _log_split("dev", dev_stats)
    stats = DataStats(
        format=fmt,
        chat_template=cfg.chat_template,
        packing=cfg.packing,
        max_length=cfg.max_length,
        streaming=False,
        dev_source=dev_source,
        train=train_stats,
        dev=dev_stats,
    )
    return DataBundle(
        train_dataset=PreferenceDataset(store, packs),
        dev_dataset=dev_dataset,
        collate_fn=PreferenceCollator(pad_id, kind),
        dev_records=_dev_entities(dev),
        format=fmt,
        stats=stats,
        fingerprints=fingerprints,
    )


def _nonempty(store: PreferenceStore, split: str, stats: SplitStats) -> PreferenceStore:
    if not len(store):
        raise DataError(
            f"the {split} split is empty: no preference rows ({stats.records_read} records "
            f"read, {sum(stats.skipped.values())} skipped, {stats.dropped_overlong} dropped as "
            "overlong). Add records or fix the data."
        )
    return store


__all__ = [
    "PreferenceCollator",
    "PreferenceDataset",
    "PreferenceEncoder",
    "PreferenceSplitStats",
    "build_preference_data",
    "count_records",
    "split_budget",
]
