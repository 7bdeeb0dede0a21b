"""Generate the demo text set: long TinyStories-style documents for continued pretraining.

Why this text: stories260K was pretrained on short TinyStories (at most 512 tokens); these
documents are longer (a few hundred to a few thousand stories260K tokens) and keep
coming back to what their first paragraph set up: the hero's name and animal, the best
friend, the home and a coloured object reappear in every episode and in the ending. So
continued pretraining on them has something to learn (the held-out perplexity falls),
rows of ``data.max_length`` cut most documents (``documents_split`` counts it), and a
longer context (``model.rope_scaling``) lets a row see the first paragraph it refers to.
Words come from the same small pools as the demo task (``make_stories``), which the
512-piece stories260K vocabulary splits into few pieces.

Deterministic: a fixed seed, pure Python, no model. ``python -m ftlab.demo.make_text --out
DIR`` writes ``DIR/train.json`` and ``DIR/dev.json`` (JSON lines, one ``{"text": ...}``
document each). Dev documents use (hero, friend, object) combinations that train never
uses.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ftlab.demo.make_stories import ANIMALS, COLOURS, NAMES, OBJECTS, write_splits

SEED = 20261128
N_TRAIN = 240
N_DEV = 24
MIN_EPISODES, MAX_EPISODES = 4, 28

HOMES = ("big tree", "river", "old barn", "little hill", "blue lake", "red house", "farm")
PLACES = ("park", "garden", "forest", "beach", "school", "shop", "pond", "zoo")
TIMES = (
    "In the morning",
    "After lunch",
    "In the evening",
    "The next day",
    "One sunny day",
    "One rainy day",
    "Later that week",
    "On Sunday",
)
WEATHER = ("sunny", "rainy", "cold", "windy", "hot", "snowy")
FOODS = ("apples", "cake", "cookies", "bread", "soup", "carrots", "pie")
THINGS = ("rock", "tree", "bench", "flower", "fence", "door", "boat")
CRAFTS = ("kite", "hat", "card", "box", "boat", "house")

INTRO = (
    "Once upon a time, there was a {animal} named {name}. {name} lived near the {home} with "
    "{poss} mom. {Poss} best friend was {friend} the {fanimal}. {name} had a {obj} that "
    "{pron} loved very much."
)
EPISODES: tuple[str, ...] = (
    "{time}, {name} went to the {place} with {friend}. They played with the {obj} until "
    "the sun went down.",
    "{time}, it was {weather}. {name} stayed at home near the {home} and looked at the "
    "{obj}. {Pron} thought about {friend}.",
    "{time}, {friend} came to visit. {friend} brought some {food}. {name} and {friend} ate "
    "the {food} under a big tree.",
    "{time}, {name} lost the {obj} at the {place}. {Pron} looked everywhere. {friend} "
    "helped, and they found it next to a {thing}.",
    "{time}, {name} met a new friend, a {animal2} named {other}. {other} liked the {obj} "
    "too, and {name} let {other} play with it.",
    "{time}, {name} was sad because {pron} could not find {friend}. Then {friend} came "
    "back from the {place}, and {name} the {animal} was happy again.",
    "{time}, {name} and {friend} made a {craft} at the {place}. It was {colour2} and very "
    "big. {friend} the {fanimal} said it was the best {craft} ever.",
    '{time}, {name} said, "{friend}, do you want to go to the {place}?" {friend} said, '
    '"Yes! Bring your {obj}!"',
    '{time}, {name} showed the {obj} to {poss} mom. Mom smiled and said, "You take good '
    'care of it, {name}."',
    "{time}, the wind blew the {obj} into the {place}. {name} and {friend} ran and ran, "
    "and at last {name} got the {obj} back.",
)
ENDING = (
    "At the end of the day, {name} the {animal} went home to the {home} with the {obj}. "
    "{name} knew that {friend} was {poss} best friend. The end."
)


@dataclass(frozen=True)
class Cast:
    """What the first paragraph sets up and every episode refers back to."""

    name: str
    animal: str
    friend: str
    fanimal: str
    home: str
    obj: str  # "<colour> <object>"

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.name, self.friend, self.obj.split()[-1])


def _slots(cast: Cast, rng: random.Random) -> dict[str, str]:
    pron, poss = ("she", "her") if NAMES[cast.name] == "f" else ("he", "his")
    others = [n for n in NAMES if n not in (cast.name, cast.friend)]
    return {
        "name": cast.name,
        "animal": cast.animal,
        "friend": cast.friend,
        "fanimal": cast.fanimal,
        "home": cast.home,
        "obj": cast.obj,
        "pron": pron,
        "Pron": pron.capitalize(),
        "poss": poss,
        "Poss": poss.capitalize(),
        "time": rng.choice(TIMES),
        "place": rng.choice(PLACES),
        "weather": rng.choice(WEATHER),
        "food": rng.choice(FOODS),
        "thing": rng.choice(THINGS),
        "craft": rng.choice(CRAFTS),
        "colour2": rng.choice(COLOURS),
        "animal2": rng.choice(ANIMALS),
        "other": rng.choice(others),
    }


def make_document(cast: Cast, rng: random.Random) -> str:
    """One document: the intro, a random run of episodes, the ending; one paragraph each."""
    paragraphs = [INTRO.format(**_slots(cast, rng))]
    for _ in range(rng.randint(MIN_EPISODES, MAX_EPISODES)):
        paragraphs.append(rng.choice(EPISODES).format(**_slots(cast, rng)))
    paragraphs.append(ENDING.format(**_slots(cast, rng)))
    return "\n\n".join(paragraphs)


def _cast(rng: random.Random) -> Cast:
    name, friend = rng.sample(list(NAMES), 2)
    return Cast(
        name=name,
        animal=rng.choice(ANIMALS),
        friend=friend,
        fanimal=rng.choice(ANIMALS),
        home=rng.choice(HOMES),
        obj=f"{rng.choice(COLOURS)} {rng.choice(OBJECTS)}",
    )


def build_splits(
    seed: int = SEED, n_train: int = N_TRAIN, n_dev: int = N_DEV
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and dev documents; dev's (hero, friend, object) combinations are not in train."""
    rng = random.Random(seed)
    dev_casts: list[Cast] = []
    while len(dev_casts) < n_dev:
        cast = _cast(rng)
        if cast.combo not in {c.combo for c in dev_casts}:
            dev_casts.append(cast)
    held_out = {c.combo for c in dev_casts}
    train_casts: list[Cast] = []
    while len(train_casts) < n_train:
        cast = _cast(rng)
        if cast.combo not in held_out:
            train_casts.append(cast)
    train = [{"text": make_document(c, rng)} for c in train_casts]
    dev = [{"text": make_document(c, rng)} for c in dev_casts]
    return train, dev


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--n-train", type=int, default=N_TRAIN)
    parser.add_argument("--n-dev", type=int, default=N_DEV)
    args = parser.parse_args(argv)
    train, dev = build_splits(args.seed, args.n_train, args.n_dev)
    write_splits(args.out, train, dev, "documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
