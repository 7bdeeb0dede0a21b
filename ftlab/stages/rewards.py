"""Reward functions for ``stage=grpo``: the built-ins, a user's own, and their checks.

``stage.rewards`` lists names; ``stage.reward_weights`` (same length, default all 1)
weighs them into the one reward a completion's advantage is computed from.

A reward function has this signature (the built-ins and a user's own alike)::

    def my_reward(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]

``prompts[i]`` is the prompt text of completion ``i`` (each prompt appears
``stage.num_generations`` times, one after the other), ``completions[i]`` its sampled
text (up to the end-of-sequence token, which is not included), ``records[i]`` the raw
data record the prompt came from (every field of the JSON line: ``src``, ``tgt``,
``entities``, ...). It returns one finite float per completion. A user's function is
named ``module:function`` and imported from the working directory (or ``PYTHONPATH``)
when the config is validated, before anything is trained.

Built-ins (``BUILTINS``):

* ``entity_recall``: share of the record's ``entities`` the completion mentions
  (``ftlab.evaluation.entity_recall``'s matching rules); the demo task's reward.
* ``exact_match``: 1 when the completion equals the record's target (its last answer),
  whitespace at either end ignored; else 0.
* ``regex_match``: 1 when the record's target, read as a regular expression, matches the
  whole completion (whitespace at either end ignored); else 0.
* ``length``: ``-max(0, words - stage.length_limit) / stage.length_limit``: 0 up to the
  limit, more negative beyond it.

A function that raises, returns the wrong number of values or a value that is not a
finite number stops the run with a ``RewardError`` naming the function, the step and
the records.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftlab.config.choices import suggest
from ftlab.data.formats import record_conversation
from ftlab.errors import ConfigError, FtlabError
from ftlab.evaluation.entity_recall import entity_hits

if TYPE_CHECKING:  # validation reads this module (ftlab --help too): numpy loads on use
    import numpy as np

RewardFn = Callable[[list[str], list[str], list[dict[str, Any]]], Sequence[float]]


class RewardError(FtlabError):
    """A reward function failed or returned something unusable during training."""


@dataclass(frozen=True)
class RewardContext:
    """What the built-ins need beyond the records: how to find a record's target."""

    data_format: str
    length_limit: int


def _targets(ctx: RewardContext, records: list[dict[str, Any]]) -> list[str]:

    return [record_conversation(r, ctx.data_format).turns[-1].assistant for r in records]


def _entity_recall(ctx: RewardContext) -> RewardFn:

    def entity_recall(
        prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        out = []
        for record, text in zip(records, completions, strict=True):
            entities = record.get("entities")
            if not isinstance(entities, list) or not entities:
                raise ValueError("the record has no non-empty 'entities' list")
            out.append(sum(entity_hits(entities, text)) / len(entities))
        return out

    return entity_recall


def _exact_match(ctx: RewardContext) -> RewardFn:
    def exact_match(
        prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        targets = _targets(ctx, records)
        return [float(c.strip() == t.strip()) for c, t in zip(completions, targets, strict=True)]

    return exact_match


def _regex_match(ctx: RewardContext) -> RewardFn:
    def regex_match(
        prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        targets = _targets(ctx, records)
        return [
            float(re.fullmatch(t.strip(), c.strip()) is not None)
            for c, t in zip(completions, targets, strict=True)
        ]

    return regex_match


def _length(ctx: RewardContext) -> RewardFn:
    limit = ctx.length_limit

    def length(
        prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        return [-max(0, len(c.split()) - limit) / limit for c in completions]

    return length


BUILTINS: dict[str, Callable[[RewardContext], RewardFn]] = {
    "entity_recall": _entity_recall,
    "exact_match": _exact_match,
    "regex_match": _regex_match,
    "length": _length,
}


def load_reward(name: str, ctx: RewardContext, load: bool = True) -> RewardFn | None:
    """The function ``name`` stands for: a built-in, ``module:function`` or ``rm:RUN_DIR``;
    ConfigError (one line, with the closest built-in names) when it cannot be had.
    ``load=False`` checks a reward model's run dir without loading the model (None)."""
    if name in BUILTINS:
        return BUILTINS[name](ctx)
    if name.startswith("rm:"):
        return _reward_model(name, name[3:], load)
    if ":" not in name:
        raise ConfigError(
            f"stage.rewards: unknown reward {name!r}.{suggest(name, list(BUILTINS))} "
            f"Built-ins: {', '.join(BUILTINS)}; your own: module:function (imported from "
            "the working directory)."
        )
    module_name, _, attr = name.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # "importable from the working directory", as documented
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (ImportError, or the module's own code failing)
        raise ConfigError(
            f"stage.rewards: {name!r}: module {module_name!r} cannot be imported from "
            f"{cwd} ({type(err).__name__}: {err}). Put {module_name}.py in the working "
            "directory or on PYTHONPATH."
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(
            f"stage.rewards: {name!r}: module {module_name!r} has no function "
            f"{attr!r}.{suggest(attr, names)}"
        )
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError:
        raise ConfigError(
            f"stage.rewards: {name!r} cannot be called as fn(prompts, completions, records) "
            f"(its signature is {inspect.signature(fn)})."
        ) from None
    return fn


def _reward_model(name: str, run_dir: str, load: bool) -> RewardFn | None:
    """A finished ``stage=rm`` run's scorer (``ftlab.stages.rm_trainer``)."""
    from pathlib import Path

    head = Path(run_dir) / "final" / "reward_head.safetensors"
    if not head.is_file():
        raise ConfigError(
            f"stage.rewards: {name!r}: {head} does not exist; rm:RUN_DIR needs a finished "
            "stage=rm run directory."
        )
    if not load:
        return None
    from ftlab.stages.rm_trainer import RewardModelScorer

    return RewardModelScorer(run_dir)


def check_reward_settings(names: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """The weights in force (all 1 by default); ConfigError for an empty list, duplicate
    names, a weight count that differs, or a weight that is not finite."""
    if not names:
        raise ConfigError(
            "stage.rewards is empty: GRPO learns from rewards. Name at least one, e.g. "
            f"stage.rewards=[entity_recall] (built-ins: {', '.join(BUILTINS)})."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"stage.rewards={list(names)} names a reward twice.")
    if weights is None:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(
            f"stage.reward_weights has {len(weights)} values for {len(names)} rewards "
            f"({', '.join(names)}): give one weight per reward."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"stage.reward_weights={list(weights)}: every weight must be finite.")
    return [float(w) for w in weights]


@dataclass
class Scored:
    """One batch's rewards: the weighted total and each function's values."""

    total: np.ndarray
    per_function: dict[str, np.ndarray]


class RewardSet:
    """The run's reward functions and weights, called on each generation batch."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], ctx: RewardContext):
        self.names = list(names)
        self.labels = [reward_label(n) for n in self.names]  # metric names
        self.weights = [float(w) for w in weights]
        self.functions = [load_reward(n, ctx) for n in self.names]

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        records: list[dict[str, Any]],
        where: list[str],
        step: int,
    ) -> Scored:
        """Every function on the batch; RewardError naming the function, the step and the
        records when one fails. ``where``: each record's ``file:line``."""
        import numpy as np

        per: dict[str, np.ndarray] = {}
        total = np.zeros(len(completions))
        functions = zip(self.names, self.labels, self.functions, self.weights, strict=True)
        for name, label, fn, weight in functions:
            values = self._call(name, fn, prompts, completions, records, where, step)
            per[label] = values
            total += weight * values
        return Scored(total, per)

    @staticmethod
    def _call(
        name: str,
        fn: RewardFn,
        prompts: list[str],
        completions: list[str],
        records: list[dict[str, Any]],
        where: list[str],
        step: int,
    ) -> np.ndarray:
        import numpy as np

        at = f"reward {name!r} at step {step}"
        try:
            values = fn(list(prompts), list(completions), [dict(r) for r in records])
        except Exception as err:
            raise RewardError(
                f"{at} raised {type(err).__name__}: {err} (on the batch of records "
                f"{_places(where)})."
            ) from err
        try:
            out = np.asarray(list(values), dtype=np.float64)
        except (TypeError, ValueError):
            raise RewardError(
                f"{at} returned {type(values).__name__} values that are not numbers "
                f"(records {_places(where)}); return one float per completion."
            ) from None
        if out.shape != (len(completions),):
            raise RewardError(
                f"{at} returned {out.size} values for {len(completions)} completions "
                f"(records {_places(where)}); return one float per completion."
            )
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            i = int(bad[0])
            raise RewardError(
                f"{at} returned {out[i]} for completion {i} of record {where[i]} "
                f"({bad.size} non-finite value(s)); rewards must be finite numbers."
            )
        return out


def reward_label(name: str) -> str:
    """The name a reward's metrics carry: ``rm:RUN_DIR`` becomes ``rm_<run dir name>``
    (a path is no tracker tag)."""
    if name.startswith("rm:"):
        from pathlib import Path

        return "rm_" + Path(name[3:]).resolve().name
    return name


def _places(where: list[str]) -> str:
    unique = list(dict.fromkeys(where))
    shown = ", ".join(unique[:3])
    return shown + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")
