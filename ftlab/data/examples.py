"""Conversations -> training examples: truncation, the overlong policy and the label shift.

PaddleNLP's causal-LM loss does not shift labels, so an example of tokens ``seq`` with
target mask ``m`` is ``input_ids = seq[:-1]`` and ``labels[i] = seq[i+1] if m[i+1] else
-100``: position i is trained to predict the next token, and only target tokens count.

Truncation: each prompt (the non-target text before an answer, bos included) keeps its
last ``src_length`` tokens (the bos stays); the whole sequence keeps its first
``max_length`` tokens, cutting answers from the right. ``overlong=drop|error`` applies
to an example that needed either cut. A cut answer gets no end-of-turn
token: it does not end there, and teaching a stop mid-answer would teach early stops.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftlab.data.encoder import TextEncoder, leading_ids
from ftlab.data.formats import Conversation
from ftlab.data.records import BadRecords
from ftlab.data.stats import SplitStats
from ftlab.data.templates import Piece, Renderer
from ftlab.errors import DataError

IGNORE = -100
ENCODE_BATCH = 512  # conversations encoded per sentencepiece batch call


@dataclass(frozen=True)
class Limits:
    src_length: int
    max_length: int
    overlong: str  # truncate | drop | error


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], IGNORE where no loss
    # Lengths of the independent sequences the row holds (summing to n): a text block
    # whose documents must not attend to each other. None: one sequence.
    seq_lens: np.ndarray | None = None

    def item(self) -> dict[str, Any]:
        """The dataset item the collator reads."""
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.seq_lens is not None:
            out["seq_lens"] = self.seq_lens
        return out


class ExampleBuilder:
    """Turns located conversations into examples, counting every cut, drop and skip."""

    def __init__(
        self, tokenizer: Any, renderer: Renderer, limits: Limits, encoder: TextEncoder | None = None
    ) -> None:
        self.renderer = renderer
        self.limits = limits
        self.encoder = encoder or TextEncoder(tokenizer)
        self.head = leading_ids(tokenizer) if renderer.add_bos else []
        self.eos = tokenizer.eos_token_id

    # ------------------------------------------------------------------ prompts

    def _prompt_and_targets(
        self, pieces: list[tuple[list[int], bool]]
    ) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """Pair each answer with the prompt before it; cut prompts to src_length."""
        pairs: list[tuple[list[int], list[int]]] = []
        prompt: list[int] = list(self.head)
        cut = False
        for ids, is_target in pieces:
            if not is_target:
                prompt = prompt + ids
                continue
            prompt, was_cut = self._cut_prompt(prompt, first=not pairs)
            cut |= was_cut
            target = ids + [self.eos] if self.renderer.eos_after_target else list(ids)
            pairs.append((prompt, target))
            prompt = []
        return pairs, cut

    def _cut_prompt(self, prompt: list[int], first: bool) -> tuple[list[int], bool]:
        limit = self.limits.src_length
        if len(prompt) <= limit:
            return prompt, False
        head = len(self.head) if first else 0
        return prompt[:head] + prompt[len(prompt) - (limit - head) :], True

    def prompt_ids(self, conv: Conversation) -> list[int]:
        """Token ids of the prompt that precedes the last answer, exactly as in training."""
        pieces = self.renderer.pieces(conv)
        encoded = self.encoder.encode([p.text for p in pieces])
        pairs, _ = self._prompt_and_targets(
            [(ids, p.target) for ids, p in zip(encoded, pieces, strict=True)]
        )
        tokens: list[int] = []
        for prompt, target in pairs[:-1]:
            tokens += prompt + target
        return tokens + pairs[-1][0]

    # ------------------------------------------------------------------ examples

    def _assemble(
        self, pieces: list[tuple[list[int], bool]], where: str, stats: SplitStats, bad: BadRecords
    ) -> Example | None:
        pairs, prompt_cut = self._prompt_and_targets(pieces)
        budget = self.limits.max_length
        tokens: list[int] = []
        mask: list[bool] = []
        target_cut = False
        full = sum(len(p) + len(t) for p, t in pairs)
        for prompt, target in pairs:
            if len(prompt) >= budget:  # no room left for any of this answer
                target_cut = True
                break
            tokens += prompt
            mask += [False] * len(prompt)
            budget -= len(prompt)
            kept = target[:budget]
            tokens += kept
            mask += [True] * len(kept)
            budget -= len(kept)
            if len(kept) < len(target):
                target_cut = True
                break
        if prompt_cut or target_cut:
            if self.limits.overlong == "error":
                raise DataError(
                    f"{where}: example is too long: {full} tokens "
                    f"(longest prompt {max(len(p) for p, _ in pairs)}), limits "
                    f"data.src_length={self.limits.src_length} for each prompt and "
                    f"data.max_length={self.limits.max_length} in all. Raise the limits or set "
                    "data.overlong=truncate or data.overlong=drop."
                )
            if self.limits.overlong == "drop":
                stats.dropped_overlong += 1
                return None
            stats.truncated_prompt += prompt_cut
            stats.truncated_target += target_cut
        seq = np.asarray(tokens, dtype=np.int32)
        labels = np.where(np.asarray(mask[1:], dtype=bool), seq[1:], IGNORE).astype(np.int32)
        n_target = int(np.count_nonzero(labels != IGNORE))
        if n_target == 0:
            bad.reject("empty_target", f"{where}: empty target: the answer encodes to no tokens")
            return None
        stats.count_example(len(seq) - 1, n_target)
        return Example(seq[:-1], labels)

    def build(
        self, items: Iterable[tuple[Conversation, str]], stats: SplitStats, bad: BadRecords
    ) -> Iterator[Example]:
        """Examples from (conversation, location) pairs, encoded in batches."""
        batch: list[tuple[Conversation, str]] = []
        for item in items:
            batch.append(item)
            if len(batch) == ENCODE_BATCH:
                yield from self._build_batch(batch, stats, bad)
                batch = []
        if batch:
            yield from self._build_batch(batch, stats, bad)

    def _render(self, conv: Conversation, where: str) -> list[Piece]:
        try:
            return self.renderer.pieces(conv)
        except DataError as err:  # a template that fails on this record: say which record
            raise DataError(f"{where}: {err}") from None

    def _build_batch(
        self, batch: list[tuple[Conversation, str]], stats: SplitStats, bad: BadRecords
    ) -> Iterator[Example]:
        rendered = [self._render(conv, where) for conv, where in batch]
        encoded = self.encoder.encode([p.text for pieces in rendered for p in pieces])
        pos = 0
        for (_, where), pieces in zip(batch, rendered, strict=True):
            ids = encoded[pos : pos + len(pieces)]
            pos += len(pieces)
            example = self._assemble(
                [(i, p.target) for i, p in zip(ids, pieces, strict=True)], where, stats, bad
            )
            if example is not None:
                yield example


class ExampleStore:
    """Examples kept as two flat int32 buffers plus offsets (compact for 100k+ examples)."""

    def __init__(self, examples: Iterable[Example] = ()) -> None:
        ids, labels, offsets = array("i"), array("i"), [0]
        seq_lens: dict[int, np.ndarray] = {}
        for ex in examples:
            if ex.seq_lens is not None:
                seq_lens[len(offsets) - 1] = ex.seq_lens
            ids.frombytes(ex.input_ids.astype(np.int32).tobytes())
            labels.frombytes(ex.labels.astype(np.int32).tobytes())
            offsets.append(len(ids))
        self.seq_lens = seq_lens
        self.ids = np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32)
        self.labels = np.frombuffer(labels, dtype=np.int32) if labels else np.zeros(0, np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> Example:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Example(self.ids[a:b], self.labels[a:b], self.seq_lens.get(i))
