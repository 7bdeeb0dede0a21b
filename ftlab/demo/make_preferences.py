"""Generate the demo preference set: the demo task's story (chosen) against the same story
with one wrong entity (rejected).

Why this set: after supervised fine-tuning on the demo task, stories260K mostly tells the
requested story but still slips (a wrong name, animal or object in some continuations).
A pair whose responses differ only in one entity isolates exactly that preference, so
DPO's reward accuracy measures whether the model learned to prefer the requested entity,
and entity recall shows whether generation follows.

Built from ``ftlab.demo.make_stories.build_splits`` (the same prompts and stories): for
each record one entity kind is chosen (cycling name, animal, object, shifted by a seeded
draw) and every mention of it in the story is replaced by another value from the pools
(a name of the same gender, so pronouns stay right; another animal; the same colour with
another object). Deterministic and pure Python. ``python -m ftlab.demo.make_preferences
--out DIR`` writes ``DIR/train.json`` and ``DIR/dev.json`` in PaddleNLP's preference form
(``src``, ``tgt``, ``response`` = [chosen, rejected], ``sort`` = [1, 0]) plus ``entities``
(the requested ones, for entity recall) and ``wrong`` (the kind replaced).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from ftlab.demo.make_stories import ANIMALS, NAMES, OBJECTS, SEED, build_splits, write_splits
from ftlab.evaluation.entity_recall import count_entity, entity_pattern

KINDS = ("name", "animal", "object")


def wrong_value(kind: str, entities: list[str], rng: random.Random) -> tuple[str, str]:
    """(the right entity, a wrong one of the same kind)."""
    name, animal, coloured = entities
    if kind == "name":
        others = [n for n, g in NAMES.items() if g == NAMES[name] and n != name]
        return name, rng.choice(others)
    if kind == "animal":
        return animal, rng.choice([a for a in ANIMALS if a != animal])
    colour, obj = coloured.split()
    return coloured, f"{colour} {rng.choice([o for o in OBJECTS if o != obj])}"


def make_pair(record: dict[str, object], kind: str, rng: random.Random) -> dict[str, object]:
    """One preference record from one demo record; checks the swap is complete."""
    story, prompt = str(record["tgt"]), str(record["src"])
    entities = [str(e) for e in record["entities"]]  # type: ignore[union-attr]
    right, wrong = wrong_value(kind, entities, rng)
    rejected = entity_pattern(right).sub(wrong, story)
    if count_entity(right, rejected) or count_entity(wrong, rejected) < 2:
        raise AssertionError(f"swap bug: {right!r} -> {wrong!r} in {story!r}")
    if count_entity(wrong, prompt):
        raise AssertionError(f"the wrong entity {wrong!r} occurs in the prompt {prompt!r}")
    return {
        "src": prompt,
        "tgt": [],
        "response": [story, rejected],
        "sort": [1, 0],
        "entities": entities,
        "wrong": kind,
    }


def build_pairs(
    seed: int = SEED,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Train and dev pairs, one per demo record (dev prompts are the demo's dev prompts)."""
    train, dev = build_splits(seed)
    rng = random.Random(seed + 1)
    offset = rng.randrange(len(KINDS))
    return tuple(  # type: ignore[return-value]
        [make_pair(r, KINDS[(i + offset) % len(KINDS)], rng) for i, r in enumerate(split)]
        for split in (train, dev)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    train, dev = build_pairs(args.seed)
    write_splits(args.out, train, dev, "preference pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
