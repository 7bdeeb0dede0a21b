"""Batch text encoding, exact to the tokenizer, fast where it can be.

PaddleNLP's slow tokenizers encode one text at a time in Python (special-token splitting,
then sentencepiece, then piece-to-id lookups): that loop dominates data preparation. For a
sentencepiece tokenizer whose plain texts encode exactly like ``sp_model.encode`` (checked
on probe texts at start), texts without special-token strings go to sentencepiece's C++
batch encoder; texts containing one keep the tokenizer's own path, so the ids are the same.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

PROBES = (
    "Once upon a time, a little dog found a red ball.",
    "  two leading spaces and trailing  ",
    "line one\nline two\ttab",
    "数字 123 and émigré naïve",
    "",
)
SP_THREADS = min(2, os.cpu_count() or 1)


def _slow_encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(
        list(texts),
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_position_ids=False,
    )
    return [list(ids) for ids in out["input_ids"]]


def leading_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text: ``[bos]`` (none when it has no bos), or
    the prefix a tokenizer adds in its place: PaddleNLP's ChatGLMv2Tokenizer (ChatGLM2/3)
    starts every input with ``[gMASK] sop`` (``get_prefix_tokens``), as the model's own
    tokenization_chatglm.py does, and has no bos."""
    prefix = getattr(tokenizer, "get_prefix_tokens", None)
    if callable(prefix):
        return [int(i) for i in prefix()]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


class TextEncoder:
    """``encode(texts)`` -> token ids per text, without special tokens added."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.sp = self._usable_sentencepiece(tokenizer)
        specials = (
            []
            if getattr(tokenizer, "split_special_tokens", False)
            else sorted(
                set(getattr(tokenizer, "unique_no_split_tokens", []) or [])
                | set(getattr(tokenizer, "all_special_tokens", []) or []),
                key=len,
                reverse=True,
            )
        )
        self.special = re.compile("|".join(map(re.escape, specials))) if specials else None
        log.info(
            "text encoding: %s",
            "sentencepiece batch encoder"
            if self.sp is not None
            else f"{type(tokenizer).__name__} (per text)",
        )

    @staticmethod
    def _usable_sentencepiece(tokenizer: Any) -> Any | None:
        sp = getattr(tokenizer, "sp_model", None)
        if sp is None or not hasattr(sp, "encode") or getattr(tokenizer, "do_lower_case", False):
            return None
        try:
            fast = sp.encode(list(PROBES))
        except Exception:  # noqa: BLE001 - an sp_model we cannot batch-call: use the tokenizer
            log.info(
                "text encoding: the tokenizer's sp_model cannot batch-encode; using the "
                "tokenizer per text"
            )
            return None
        if fast != _slow_encode(tokenizer, PROBES):
            log.info(
                "text encoding: sentencepiece ids differ from the tokenizer's on probe "
                "texts; using the tokenizer per text"
            )
            return None
        return sp

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.sp is None:
            return _slow_encode(self.tokenizer, texts)
        slow_idx = (
            [i for i, t in enumerate(texts) if self.special.search(t)]
            if self.special is not None
            else []
        )
        if not slow_idx:
            return self.sp.encode(list(texts), num_threads=SP_THREADS)
        slow = set(slow_idx)
        out = self.sp.encode(
            [("" if i in slow else t) for i, t in enumerate(texts)], num_threads=SP_THREADS
        )
        for i, ids in zip(
            slow_idx, _slow_encode(self.tokenizer, [texts[i] for i in slow_idx]), strict=True
        ):
            out[i] = ids
        return out
