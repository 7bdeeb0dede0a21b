"""``DataBundle``: what the data pipeline hands to training (datasets, collator, stats,
dev records), one type for a single dataset, a weighted mixture and preference data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle

from ftlab.data.formats import record_conversation
from ftlab.data.stats import DataStats
from ftlab.errors import DataError

if TYPE_CHECKING:
    from ftlab.data.examples import ExampleBuilder
    from ftlab.data.text import DocumentBuilder


@dataclass(frozen=True)
class GenerationItem:
    prompt: str  # the last user turn, for people reading predictions.jsonl
    prompt_ids: list[int]
    reference: str
    source: str | None = None  # a mixture's source name


@dataclass
class DataBundle:
    """What training needs from the data; ``encode_prompt`` serves generation."""

    train_dataset: paddle.io.Dataset | paddle.io.IterableDataset
    dev_dataset: paddle.io.Dataset | None
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, np.ndarray]]
    dev_records: list[dict[str, Any]]
    format: str
    stats: DataStats
    fingerprints: dict[str, str] = field(default_factory=dict)
    builder: ExampleBuilder | DocumentBuilder | None = field(default=None, repr=False)
    # A weighted mixture's sources by name (ftlab.data.mixture), each a bundle of its own.
    parts: dict[str, DataBundle] = field(default_factory=dict, repr=False)

    def generation_items(self) -> list[GenerationItem]:
        """Per dev record: its prompt as training renders and cuts it, and the answer.

        The answer is the last assistant turn (what generation is scored against); a
        mixture lists its sources' records in source order, each named.
        """
        if self.parts:
            return [
                dataclasses.replace(item, source=name)
                for name, part in self.parts.items()
                for item in part.generation_items()
            ]
        items = []
        for record in self.dev_records:
            conv = record_conversation(record, self.format)
            items.append(
                GenerationItem(
                    prompt=conv.turns[-1].user_text(),
                    prompt_ids=self.encode_prompt(record),
                    reference=conv.turns[-1].assistant,
                )
            )
        return items

    def encode_prompt(self, record: dict[str, Any]) -> list[int]:
        """Prompt token ids for a raw record, rendered and cut exactly as in training."""
        if self.builder is None:
            raise DataError(
                "this DataBundle was built without an example builder; build it "
                "with ftlab.data.build_data to encode prompts."
            )
        return self.builder.prompt_ids(record_conversation(record, self.format))
