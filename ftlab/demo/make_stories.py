"""Generate the demo task: short instructions -> TinyStories-style stories about given entities.

Why this task: a model pretrained on TinyStories (stories260K) continues any prompt with
*some* story, but not with the name, animal and coloured object it was asked for. After a
few dozen fine-tuning steps it does, and the dev split holds (name, animal, object)
combinations that never occur in train, so the gain measures copying entities from the
prompt, not memorised stories. Words come from small pools of short, frequent TinyStories
words that the 512-piece stories260K vocabulary splits into few pieces.

Deterministic: a fixed seed, pure Python, no model. ``python -m ftlab.demo.make_stories
--out DIR`` writes ``DIR/train.json`` and ``DIR/dev.json`` (JSON lines, one record each:
``{"src": ..., "tgt": ..., "entities": [name, animal, "<colour> <object>"]}``).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftlab.evaluation.entity_recall import count_entity

SEED = 20240611
N_TRAIN = 2000
N_DEV = 48
MIN_MENTIONS = 2  # every entity occurs at least this often in every story

# name -> grammatical gender of the named animal (picks he/she, his/her).
NAMES: dict[str, str] = {
    "Lily": "f", "Tim": "m", "Ben": "m", "Sam": "m", "Tom": "m", "Sue": "f", "Mia": "f",
    "Sara": "f", "Bob": "m", "Mike": "m", "Amy": "f", "Jen": "f", "Max": "m", "Kim": "f",
    "Dan": "m", "Tina": "f",
}  # fmt: skip
ANIMALS: tuple[str, ...] = (
    "dog", "cat", "bird", "duck", "bear", "pig", "cow", "lion", "fox", "frog",
)  # fmt: skip
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "pink", "white", "black")
OBJECTS: tuple[str, ...] = (
    "ball", "hat", "car", "box", "kite", "cup", "book", "boat", "bag", "drum", "doll", "bell",
)  # fmt: skip

# How the instruction is phrased; {event} is one of EVENTS' phrases.
FRAMES: tuple[str, ...] = (
    "Write a short story about a {animal} named {name} who {event}.",
    "Tell me a story about {name} the {animal}, who {event}.",
    "Write a story for kids about a {animal} called {name} who {event}.",
    "Please write a short story. It is about a {animal} named {name} who {event}.",
)
# What happens: the phrase used in the instruction, and two story plots for it, so the
# model has to follow the instruction and copy the entities rather than recall one text.
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "finds": (
        "finds a {obj}",
        (
            "Once upon a time, there was a little {animal} named {name}. One day, {name} "
            "found a {obj} in the park. {Pron} was very happy. The {animal} played with the "
            "{obj} all day.",
            "{name} was a happy {animal}. One day, {name} saw a {obj} under a big tree. "
            "{Pron} ran to get it. The {animal} loved the {obj} very much.",
        ),
    ),
    "loses": (
        "loses {poss} {obj}",
        (
            "Once upon a time, there was a {animal} named {name}. {name} had a {obj}. One "
            "day, {name} lost the {obj}. The sad {animal} looked and looked, and then {pron} "
            "found the {obj} under {poss} bed.",
            "{name} the {animal} loved {poss} {obj}. But one day, the {obj} was gone! {name} "
            "was sad. Then {pron} saw it in the garden, and the {animal} smiled.",
        ),
    ),
    "wants": (
        "wants a {obj}",
        (
            "Once upon a time, a little {animal} named {name} saw a {obj} in a shop. {name} "
            "wanted the {obj} very much. {Poss} mom said yes, and the {animal} was so happy.",
            "{name} was a little {animal}. {Pron} wanted a {obj} more than anything. On "
            '{poss} birthday, {name} got a {obj}! The {animal} said, "Thank you, Mom!"',
        ),
    ),
    "shares": (
        "shares {poss} {obj} with a friend",
        (
            "There was a kind {animal} named {name}. {name} had a {obj}. One day, {name} met "
            "a sad friend. The {animal} shared the {obj}, and they played together.",
            "Once upon a time, {name} the {animal} went to the park with a {obj}. {Pron} saw "
            'a friend who had no toys. {name} said, "Let\'s play with my {obj}!" The {animal} '
            "and {poss} friend had fun.",
        ),
    ),
}
EVENT_NAMES: tuple[str, ...] = tuple(EVENTS)


@dataclass(frozen=True)
class StorySpec:
    """Everything that decides one record's text."""

    name: str
    animal: str
    colour: str
    obj: str
    event: str
    frame: int
    plot: int

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.name, self.animal, self.obj)


def _fill(template: str, spec: StorySpec) -> str:
    female = NAMES[spec.name] == "f"
    pron, poss = ("she", "her") if female else ("he", "his")
    return template.format(
        name=spec.name,
        animal=spec.animal,
        obj=f"{spec.colour} {spec.obj}",
        pron=pron,
        Pron=pron.capitalize(),
        poss=poss,
        Poss=poss.capitalize(),
    )


def make_record(spec: StorySpec) -> dict[str, object]:
    """One record; checks that every entity is mentioned at least MIN_MENTIONS times."""
    phrase, plots = EVENTS[spec.event]
    event = _fill(phrase, spec)
    src = FRAMES[spec.frame].format(animal=spec.animal, name=spec.name, event=event)
    tgt = _fill(plots[spec.plot], spec)
    entities = [spec.name, spec.animal, f"{spec.colour} {spec.obj}"]
    for entity in entities:
        n = count_entity(entity, tgt)
        if n < MIN_MENTIONS:
            raise AssertionError(f"template bug: {entity!r} occurs {n}x in {tgt!r}")
    return {"src": src, "tgt": tgt, "entities": entities}


def combo_key(record: dict[str, object]) -> tuple[str, str, str]:
    """(name, animal, object noun) of a record: the unit that dev never shares with train."""
    name, animal, coloured_obj = record["entities"]  # type: ignore[misc]
    return (str(name), str(animal), str(coloured_obj).split()[-1])


def build_splits(
    seed: int = SEED, n_train: int = N_TRAIN, n_dev: int = N_DEV
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Train and dev records; dev combinations (name, animal, object) never occur in train.

    Train instructions are all distinct: they are drawn without replacement from every
    (combination, colour, event, frame) outside the dev combinations.
    """
    rng = random.Random(seed)
    combos = [(n, a, o) for n in NAMES for a in ANIMALS for o in OBJECTS]
    dev_combos = rng.sample(combos, n_dev)
    held_out = set(dev_combos)
    train_combos = [c for c in combos if c not in held_out]

    def spec_for(combo: tuple[str, str, str], colour: str, event: str, frame: int) -> StorySpec:
        plot = rng.randrange(len(EVENTS[event][1]))
        return StorySpec(combo[0], combo[1], colour, combo[2], event, frame, plot)

    dev = [
        make_record(
            spec_for(c, rng.choice(COLOURS), rng.choice(EVENT_NAMES), rng.randrange(len(FRAMES)))
        )
        for c in dev_combos
    ]

    # Mixed-radix index over (combo, colour, event, frame), sampled without replacement.
    radix = (len(train_combos), len(COLOURS), len(EVENT_NAMES), len(FRAMES))
    space = radix[0] * radix[1] * radix[2] * radix[3]
    if n_train > space:
        raise ValueError(f"n_train={n_train} exceeds the {space} distinct train instructions")
    train = []
    for index in rng.sample(range(space), n_train):
        index, frame = divmod(index, radix[3])
        index, event = divmod(index, radix[2])
        combo, colour = divmod(index, radix[1])
        spec = spec_for(train_combos[combo], COLOURS[colour], EVENT_NAMES[event], frame)
        train.append(make_record(spec))

    overlap = {combo_key(r) for r in train} & {combo_key(r) for r in dev}
    if overlap:
        raise AssertionError(f"dev combinations leaked into train: {sorted(overlap)[:5]}")
    return train, dev


def write_jsonl(records: Iterable[dict[str, object]], path: Path) -> None:
    """One JSON object per line, fixed key order and newline, so reruns are byte-identical."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_splits(
    out: Path, train: list[dict[str, object]], dev: list[dict[str, object]], noun: str
) -> None:
    """``out/train.json`` and ``out/dev.json`` (every demo set's layout), and say so."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.json")
    write_jsonl(dev, out / "dev.json")
    print(f"wrote {len(train)} train and {len(dev)} dev {noun} to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-dev", type=int, default=N_DEV)
    args = parser.parse_args(argv)
    train, dev = build_splits(args.seed, args.n_train, args.n_dev)
    write_splits(args.out, train, dev, "records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
