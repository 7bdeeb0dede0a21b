"""GRPO's data: the prompts of SFT-format records, whole, with the records themselves.

Records are read, checked and split into train and dev exactly as for SFT
(``ftlab.data.build``'s readers: bad records by ``data.on_bad_record``, file:line,
fingerprints, ``dev_from_train``). A prompt is rendered as training renders it
(``data.chat_template``, ``[bos]`` first) but never cut: a cut prompt asks another
question than the one the reward scores the answer to. A prompt that does not leave
``stage.max_new_tokens`` positions free within ``data.max_length`` is refused before
training, naming its file and line.

The datasets hold prompt indices; the trainer looks the prompts and records up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle

from ftlab.data.build import _check_tokenizer, _dev_pairs, _valid
from ftlab.data.bundle import DataBundle
from ftlab.data.examples import ExampleBuilder, Limits
from ftlab.data.formats import detect_format
from ftlab.data.records import BadRecords, read_split
from ftlab.data.settings import check_data_settings
from ftlab.data.splits import resolve_split_files
from ftlab.data.stats import DataStats, SplitStats
from ftlab.data.templates import make_renderer
from ftlab.errors import DataError

if TYPE_CHECKING:
    from ftlab.config.schema import RunConfig

NO_CUT = 1 << 30  # a src_length no prompt reaches: prompts are never cut here


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # [bos] + the rendered prompt, as training and generation see it
    text: str  # the last user turn: what reward functions get as the prompt
    record: dict[str, Any]  # the raw record (rewards read its fields)
    where: str  # file:line


class PromptDataset(paddle.io.Dataset):
    """Item i is ``{"prompt_index": i}``; ``prompts`` holds what the index stands for."""

    def __init__(self, prompts: list[Prompt], data_format: str) -> None:
        self.prompts = prompts
        self.data_format = data_format  # how reward functions find a record's target

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompt_index": np.int64(i)}


def collate_indices(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {"prompt_index": np.asarray([it["prompt_index"] for it in items], dtype=np.int64)}


def build_prompt_data(run: RunConfig, tokenizer: Any) -> DataBundle:

    cfg, s = run.data, run.stage
    check_data_settings(cfg, run.train.max_steps)
    _check_tokenizer(tokenizer)
    train_files = resolve_split_files(cfg, "train")
    dev_files = resolve_split_files(cfg, "dev")
    fingerprints: dict[str, str] = {}
    train_stats = SplitStats()
    bad = BadRecords(cfg.on_bad_record, train_stats)
    records = read_split(train_files, bad, train_stats, fingerprints)
    if not records:
        raise DataError(f"the train split is empty: {', '.join(map(str, train_files))}.")
    fmt = detect_format(records, cfg.format)
    train_pairs, dev_pairs, dev_stats, dev_source = _dev_pairs(
        cfg, dev_files, _valid(records, fmt, bad), fmt, run.train.seed, fingerprints
    )
    builder = ExampleBuilder(
        tokenizer, make_renderer(cfg.chat_template, tokenizer), Limits(NO_CUT, NO_CUT, "error")
    )
    room = cfg.max_length - s.max_new_tokens
    train = _prompts(builder, train_pairs, room, cfg.max_length, s.max_new_tokens, train_stats)
    dev = _prompts(
        builder, dev_pairs, room, cfg.max_length, s.max_new_tokens, dev_stats or SplitStats()
    )
    if not dev:
        raise DataError(
            f"stage=grpo reports the reward on dev prompts, but data.path={cfg.path} has no "
            "dev split: add dev.json (or data.dev_path), or set data.dev_from_train=0.05."
        )
    stats = DataStats(
        format=fmt,
        chat_template=cfg.chat_template,
        packing="none",
        max_length=cfg.max_length,
        streaming=False,
        dev_source=dev_source,
        train=train_stats,
        dev=dev_stats,
    )
    return DataBundle(
        train_dataset=PromptDataset(train, fmt),
        dev_dataset=PromptDataset(dev, fmt),
        collate_fn=collate_indices,
        dev_records=[p.record for p in dev],
        format=fmt,
        stats=stats,
        fingerprints=fingerprints,
        builder=builder,
    )


def _prompts(
    builder: ExampleBuilder,
    pairs: list[tuple[Any, Any]],
    room: int,
    max_length: int,
    max_new_tokens: int,
    stats: SplitStats,
) -> list[Prompt]:
    out = []
    for record, conv in pairs:
        ids = builder.prompt_ids(conv)
        if len(ids) > room:
            raise DataError(
                f"{record.where}: the prompt is {len(ids)} tokens; with stage.max_new_tokens="
                f"{max_new_tokens} it does not fit data.max_length={max_length} (GRPO never "
                "cuts a prompt: the reward scores the answer to the whole question). Raise "
                "data.max_length, lower stage.max_new_tokens, or shorten the record."
            )
        out.append(Prompt(ids, conv.turns[-1].user_text(), dict(record.data), record.where))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.max_tokens = max(stats.max_tokens, len(ids))
    return out
