"""Entity recall: the demo task's metric.

For each dev record with an ``entities`` list, greedy-generate a continuation of its
prompt and count which requested entities the continuation mentions. A base TinyStories
model tells *a* story; a fine-tuned one tells the requested story, so this share rises
visibly where loss alone says little to a reader.

Matching rules (``entity_pattern``): case-insensitive, whole words only ("Max" matches
"max" and "Max's" but not "Maxi"). A multi-word entity ("red ball") matches only as the
same words, in order, separated by whitespace ("the red  ball" yes, "red big ball" no,
"red-ball" no, "ball is red" no). Only the generated continuation is searched, never the
prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftlab.evaluation.generation import generate_texts


def entity_pattern(entity: str) -> re.Pattern[str]:
    """Regex for one entity under the module's matching rules."""
    words = entity.split()
    if not words:
        raise ValueError(f"entity {entity!r} has no words")
    body = r"\s+".join(re.escape(w) for w in words)
    # Look-arounds rather than \b so entities that start or end with punctuation still
    # need a non-word character (or the text's edge) on each side.
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def count_entity(entity: str, text: str) -> int:
    """How many non-overlapping times ``entity`` occurs in ``text``."""
    return len(entity_pattern(entity).findall(text))


def entity_hits(entities: Sequence[str], text: str) -> list[bool]:
    """For each entity, whether ``text`` mentions it."""
    return [entity_pattern(e).search(text) is not None for e in entities]


@dataclass
class RecordRecall:
    """One dev record's prompt, greedy output and which entities the output mentioned."""

    prompt: str
    output: str
    entities: list[str]
    hits: list[bool]


@dataclass
class EntityRecall:
    """``score`` = mentioned entities / requested entities, over all scored records."""

    score: float
    n_records: int
    n_entities: int
    n_hits: int
    records: list[RecordRecall] = field(default_factory=list)


def entity_recall(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    outputs: Sequence[str] | None = None,
) -> EntityRecall:
    """Greedy entity recall of ``model`` on the records that carry ``entities``.

    Records need ``src`` (the prompt) and ``entities`` (a non-empty list of strings);
    records without ``entities`` are not scored. Greedy decoding makes the score a pure
    function of the model, tokenizer, records and these settings. ``outputs``: the greedy
    continuations of the scored records' prompts, already generated (by the generation
    metric), instead of generating them again.
    """
    scored = [r for r in records if r.get("entities") is not None]
    if not scored:
        raise ValueError("no record has an 'entities' list: entity recall has nothing to score")
    for i, r in enumerate(scored):
        ents = r["entities"]
        if not isinstance(ents, list) or not ents or not all(isinstance(e, str) for e in ents):
            raise ValueError(f"record {i}: 'entities' must be a non-empty list of strings")
        if not isinstance(r.get("src"), str):
            raise ValueError(f"record {i}: has 'entities' but no string 'src' prompt")

    prompts = [str(r["src"]) for r in scored]
    if outputs is None:
        outputs = generate_texts(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            strategy="greedy",
            pad_token_id=pad_token_id,
        )
    elif len(outputs) != len(scored):
        raise ValueError(f"{len(outputs)} outputs for {len(scored)} scored records")
    details = []
    for r, prompt, output in zip(scored, prompts, outputs, strict=True):
        entities = list(r["entities"])
        details.append(RecordRecall(prompt, output, entities, entity_hits(entities, output)))
    n_entities = sum(len(d.entities) for d in details)
    n_hits = sum(sum(d.hits) for d in details)
    return EntityRecall(n_hits / n_entities, len(details), n_entities, n_hits, details)
