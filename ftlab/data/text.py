"""Pretraining-style text: documents -> training rows with loss on every token.

Each document is ``[bos] + tokens + [eos]`` (bos when the tokenizer has one). How the
documents become rows of at most ``max_length`` positions follows ``data.packing``:

* ``none``: the documents are concatenated into one stream and cut into blocks of
  ``max_length`` (the classic pretraining layout). Consecutive blocks overlap by one
  token, so every token after the first is a label exactly once. Inside a block a
  document attends to the documents before it (separated by eos).
* ``zero_padding``: the same blocks, but each carries its documents' lengths, so the
  collator gives them a block-diagonal mask (dense, or FlashMask indices) and position
  ids restarting at each document: documents do not attend to each other. The label that
  would cross into the next document (eos -> next bos) is dropped: that position cannot
  see the next document.
* ``greedy``: a document is cut only when it is longer than a row (into pieces of
  ``max_length``, again overlapping by one token), and the pieces are packed best-fit
  like instruction examples, with the same per-document masks.

The dev split is always one piece per row (documents alone, cut only when longer than a
row), so its loss and perplexity do not depend on the packing.

PaddleNLP's ``autoregressive`` mode tokenizes each record as one example without any
cut; rows longer than ``max_length`` are then skipped by its zero padding. Here nothing
is skipped: long documents are split and counted (``documents_split``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftlab.data.encoder import TextEncoder, leading_ids
from ftlab.data.examples import ENCODE_BATCH, IGNORE, Example
from ftlab.data.formats import Document
from ftlab.data.records import BadRecords
from ftlab.data.stats import SplitStats
from ftlab.errors import DataError

LAYOUTS = ("blocks", "document_blocks", "pieces")


@dataclass(frozen=True)
class _Run:
    """Consecutive tokens of one document inside the stream."""

    tokens: np.ndarray
    doc: int  # the document's index in the stream
    begins: bool  # the run starts the document


def _take(runs: list[_Run], n: int) -> tuple[list[_Run], list[_Run]]:
    """The first ``n`` tokens of the stream, and the rest starting at the last taken token
    (blocks overlap by one token, so that token's label is the next block's)."""
    taken: list[_Run] = []
    need = n
    for i, run in enumerate(runs):
        size = len(run.tokens)
        if size <= need:
            taken.append(run)
            need -= size
            if need == 0:
                return taken, [_Run(run.tokens[-1:], run.doc, False), *runs[i + 1 :]]
            continue
        taken.append(_Run(run.tokens[:need], run.doc, run.begins))
        return taken, [_Run(run.tokens[need - 1 :], run.doc, False), *runs[i + 1 :]]
    raise AssertionError(f"the stream holds fewer than {n} tokens")


def text_layout(packing: str) -> str:
    """The train rows for ``data.packing`` (see the module docstring)."""
    return {"none": "blocks", "zero_padding": "document_blocks", "greedy": "pieces"}[packing]


class DocumentBuilder:
    """Turns located documents into training rows (``Example``), counting what is split.

    ``layout``: ``blocks`` (one stream cut every ``max_length``), ``document_blocks``
    (the same, with per-document ``seq_lens``) or ``pieces`` (each document alone, cut
    only when longer than a row; the caller packs them).
    """

    def __init__(
        self, tokenizer: Any, max_length: int, layout: str, encoder: TextEncoder | None = None
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        self.max_length = max_length
        self.layout = layout
        self.encoder = encoder or TextEncoder(tokenizer)
        self.head = leading_ids(tokenizer)
        self.eos = tokenizer.eos_token_id

    @property
    def rows_are_final(self) -> bool:
        """Rows go to the collator as they are (blocks); pieces still need packing."""
        return self.layout != "pieces"

    def prompt_ids(self, conv: Any) -> list[int]:
        raise DataError(
            "text data has no prompts: generation-based metrics (eval.demo_metric) need "
            "instruction records."
        )

    # ------------------------------------------------------------------ tokens

    def _documents(
        self, items: Iterable[tuple[Document, str]], bad: BadRecords
    ) -> Iterator[np.ndarray]:
        batch: list[tuple[Document, str]] = []
        for item in items:
            batch.append(item)
            if len(batch) == ENCODE_BATCH:
                yield from self._encode(batch, bad)
                batch = []
        if batch:
            yield from self._encode(batch, bad)

    def _encode(self, batch: list[tuple[Document, str]], bad: BadRecords) -> Iterator[np.ndarray]:
        head = self.head
        for (_, where), ids in zip(
            batch, self.encoder.encode([d.text for d, _ in batch]), strict=True
        ):
            if not ids:
                bad.reject("empty_text", f"{where}: empty document: the text encodes to no tokens")
                continue
            yield np.asarray(head + list(ids) + [self.eos], dtype=np.int32)

    # ------------------------------------------------------------------ rows

    def build(
        self, items: Iterable[tuple[Document, str]], stats: SplitStats, bad: BadRecords
    ) -> Iterator[Example]:
        """Rows from (document, location) pairs, in order."""
        docs = self._documents(items, bad)
        if self.layout == "pieces":
            return self._pieces(docs, stats)
        return self._blocks(docs, stats, self.layout == "document_blocks")

    def _emit(
        self,
        seq: np.ndarray,
        stats: SplitStats,
        keep: np.ndarray | None = None,
        seq_lens: list[int] | None = None,
    ) -> Example:
        labels = seq[1:].copy()
        if keep is not None:
            labels[~keep] = IGNORE
        stats.count_example(len(seq) - 1, int(np.count_nonzero(labels != IGNORE)))
        lens = None if seq_lens is None else np.asarray(seq_lens, dtype=np.int32)
        return Example(seq[:-1], labels.astype(np.int32), lens)

    def _pieces(self, docs: Iterator[np.ndarray], stats: SplitStats) -> Iterator[Example]:
        step = self.max_length
        for tokens in docs:
            stats.documents += 1
            stats.documents_split += len(tokens) - 1 > step
            for start in range(0, len(tokens) - 1, step):
                yield self._emit(tokens[start : start + step + 1], stats)

    def _blocks(
        self, docs: Iterator[np.ndarray], stats: SplitStats, masked: bool
    ) -> Iterator[Example]:
        """Cut the concatenated stream every ``max_length`` tokens (one token of overlap)."""
        width = self.max_length
        runs: list[_Run] = []  # token runs not yet emitted, each within one document
        held, last_split = 0, -1
        for doc, tokens in enumerate(docs):
            stats.documents += 1
            runs.append(_Run(tokens, doc, True))
            held += len(tokens)
            while held >= width + 1:
                block, runs = _take(runs, width + 1)
                held -= width
                if len(runs[0].tokens) > 1 and runs[0].doc != last_split:
                    last_split = runs[0].doc  # the document goes on in the next block
                    stats.documents_split += 1
                yield self._block(block, stats, masked)
        if held >= 2:
            block, _ = _take(runs, held)
            yield self._block(block, stats, masked)

    def _block(self, runs: list[_Run], stats: SplitStats, masked: bool) -> Example:
        seq = np.concatenate([r.tokens for r in runs])
        if not masked:
            return self._emit(seq, stats)
        # Input positions 0..n-2; a document segment starts at each run that begins one.
        lengths, keep = [], np.ones(len(seq) - 1, dtype=bool)
        pos = 0
        for k, run in enumerate(runs):
            if run.begins or k == 0:
                lengths.append(0)
            lengths[-1] += len(run.tokens)
            pos += len(run.tokens)
            if k + 1 < len(runs) and runs[k + 1].begins:
                keep[pos - 1] = False  # label = the next document's first token
        lengths[-1] -= 1  # the block's last token is a label only
        lengths = [n for n in lengths if n > 0]
        return self._emit(seq, stats, keep, lengths)
