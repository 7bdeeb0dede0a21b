"""Counts the data pipeline keeps, so nothing is dropped, skipped or cut without a trace.

The counts land in the run summary (``DataStats.to_dict``); the first few skipped records
are kept by location so a user can find and fix them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

SAMPLES_KEPT = 5  # locations of skipped records kept per split


@dataclass
class SplitStats:
    """Counts for one split (train or dev)."""

    files: int = 0
    records_read: int = 0  # non-blank lines seen
    blank_lines: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (on_bad_record=skip)
    skipped_samples: list[str] = field(default_factory=list)  # "file:line: reason"
    examples: int = 0  # tokenized examples produced
    truncated_prompt: int = 0  # examples whose prompt was cut from the left
    truncated_target: int = 0  # examples whose target was cut from the right
    dropped_overlong: int = 0  # examples dropped under overlong=drop
    tokens: int = 0  # input positions over all examples (after the label shift)
    target_tokens: int = 0  # positions that carry a label (loss)
    max_tokens: int = 0  # longest example
    packs: int | None = None  # sequences after packing (None: not packed)
    packing_efficiency: float | None = None  # packed tokens / (packs * max_length)
    epochs_started: int | None = None  # streaming only: passes begun over the files
    documents: int = 0  # text formats: documents tokenized
    documents_split: int = 0  # text formats: documents that continue in another row
    # Streaming counts are this process's, cumulative over passes (a skipped record is
    # counted again on every pass that reads it).

    def count_skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_samples) < SAMPLES_KEPT:
            self.skipped_samples.append(message)

    def count_example(self, length: int, target_tokens: int) -> None:
        self.examples += 1
        self.tokens += length
        self.target_tokens += target_tokens
        self.max_tokens = max(self.max_tokens, length)

    def set_packing(self, packs: int, capacity: int, packed_tokens: int) -> None:
        self.packs = packs
        self.packing_efficiency = round(packed_tokens / (packs * capacity), 4) if packs else None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["skipped"] = dict(self.skipped)
        out["skipped_samples"] = list(self.skipped_samples)
        out["records_skipped"] = sum(self.skipped.values())
        return out


@dataclass
class SourceStats:
    """One source of a weighted mixture (``data.sources``): what it held and what the
    mixture drew from it."""

    name: str
    path: str
    format: str
    chat_template: str | None
    on_bad_record: str
    weight: float  # requested, normalised over the sources
    fingerprint: str  # sha256 over the sha256 of each of its files
    split: SplitStats  # its train split: records read, skips, cuts, examples
    dev_examples: int | None = None
    drawn: int = 0  # examples of this source in the mixture (repeats counted)
    drawn_tokens: int = 0  # their input positions, after truncation
    drawn_target_tokens: int = 0
    eval_loss: float | None = None  # on its own dev split, after training

    def draw(self, length: int, target_tokens: int) -> None:
        self.drawn += 1
        self.drawn_tokens += length
        self.drawn_target_tokens += target_tokens

    def to_dict(self, total_drawn: int, total_tokens: int) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "split"}
        out["split"] = self.split.to_dict()
        out["share"] = round(self.drawn / total_drawn, 6) if total_drawn else None
        out["token_share"] = round(self.drawn_tokens / total_tokens, 6) if total_tokens else None
        # Passes over the source's examples (above 1: repeated, below: not all used).
        out["passes"] = round(self.drawn / self.split.examples, 4) if self.split.examples else None
        return out


@dataclass
class DataStats:
    """Everything the run summary reports about the data."""

    format: str
    chat_template: str | None
    packing: str
    max_length: int
    streaming: bool
    dev_source: str | None  # "file" | "dev_from_train" | None
    train: SplitStats = field(default_factory=SplitStats)
    dev: SplitStats | None = None
    sources: list[SourceStats] | None = None  # a weighted mixture's sources

    def set_source_eval_loss(self, name: str, loss: float | None) -> None:
        for src in self.sources or []:
            if src.name == name:
                src.eval_loss = loss

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["train"] = self.train.to_dict()
        out["dev"] = self.dev.to_dict() if self.dev is not None else None
        if self.sources is not None:
            drawn = sum(s.drawn for s in self.sources)
            tokens = sum(s.drawn_tokens for s in self.sources)
            out["sources"] = [s.to_dict(drawn, tokens) for s in self.sources]
        return out
