"""The best checkpoint and early stopping: ``train.metric_for_best_model``,
``train.greater_is_better``, ``train.load_best_model_at_end``, ``train.early_stopping_*``.

PaddleNLP's Trainer ranks a checkpoint when it saves one right after an evaluation
(``_save_checkpoint(model, metrics)``), loads the best one at the end of ``train()``, and
its ``EarlyStoppingCallback`` compares each evaluation with the best checkpoint's value
(asserting, mid-run, what it needs). Everything it would assert or silently get wrong
is refused here, before anything is loaded: a metric no evaluation computes (PaddleNLP
raises a KeyError at the first save), evaluations that never meet a save, early stopping
without evaluations, a direction the metric contradicts.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from ftlab.config.schema import TrainSettings
from ftlab.config.trainer_options import (
    EVAL_METRICS,
    FINAL_ONLY_METRICS,
    best_metric_name,
    eval_metrics,
)
from ftlab.errors import ConfigError

DEFAULT_METRIC = "loss"  # PaddleNLP's default with load_best_model_at_end


def best_metric(t: TrainSettings) -> str | None:
    """The metric that ranks checkpoints (None: the run ranks none)."""
    if t.metric_for_best_model is not None:
        return t.metric_for_best_model
    if t.load_best_model_at_end or t.early_stopping_patience > 0:
        return DEFAULT_METRIC
    return None


def check_best_checkpoint(
    t: TrainSettings, likelihood: bool, method: str = "", unified: bool = True
) -> dict[str, Any]:
    """Refuse what cannot work; the derived values (metric, direction) for the record.
    ``likelihood``: the stage's loss is a likelihood (its evaluations compute ppl);
    ``unified``: the method saves PaddleNLP's unified checkpoint (``Method``)."""
    if t.load_best_model_at_end and not unified:
        # PaddleNLP 3.0.0b4 looks for its own weight file in the best checkpoint and, when
        # it is missing, only logs a warning: final/ would silently be the last step.
        raise ConfigError(
            f"train.load_best_model_at_end=true with method={method}: the method saves its "
            "own checkpoint state, which PaddleNLP's best-model loading cannot read (final/ "
            "would silently be the last step). Keep train.metric_for_best_model to name the "
            "best step, and load that checkpoint's state yourself."
        )
    if t.early_stopping_patience < 0:
        raise ConfigError(
            f"train.early_stopping_patience={t.early_stopping_patience}: give the number of "
            "evaluations without improvement after which training stops (0: never)."
        )
    if not (math.isfinite(t.early_stopping_threshold) and t.early_stopping_threshold >= 0):
        raise ConfigError(
            f"train.early_stopping_threshold={t.early_stopping_threshold}: must be >= 0 (how "
            "much the metric must improve for an evaluation to count as better)."
        )
    metric = best_metric(t)
    if metric is None:
        return {}
    name = _check_metric(metric, likelihood)
    implied = EVAL_METRICS[name]
    if t.greater_is_better is not None and t.greater_is_better != implied:
        raise ConfigError(
            f"train.greater_is_better={t.greater_is_better} with train.metric_for_best_model="
            f"{metric}: a {'higher' if implied else 'lower'} {name} is better. Leave "
            "train.greater_is_better unset: ftlab derives it from the metric."
        )
    _check_cadence(t, metric)
    return {"metric_for_best_model": metric, "greater_is_better": implied}


def _check_metric(metric: str, likelihood: bool) -> str:
    name = best_metric_name(metric)
    computed = eval_metrics(likelihood)
    if name in computed:
        return name
    listed = ", ".join(computed)
    if name in FINAL_ONLY_METRICS:
        raise ConfigError(
            f"train.metric_for_best_model={metric}: ftlab computes {name} once, after "
            f"training, so it cannot rank checkpoints; evaluations during training compute "
            f"{listed}."
        )
    if name in EVAL_METRICS:  # ppl of a preference stage
        raise ConfigError(
            f"train.metric_for_best_model={metric}: this stage's loss is not a likelihood, so "
            f"its evaluations compute no {name}; they compute {listed}."
        )
    close = difflib.get_close_matches(name, [*computed, *FINAL_ONLY_METRICS], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        f"train.metric_for_best_model={metric}: not a metric the run's evaluations "
        f"compute{hint}; they compute {listed} (the eval_ prefix is optional)."
    )


def _check_cadence(t: TrainSettings, metric: str) -> None:
    """Evaluations that meet checkpoints: a checkpoint is ranked only when saved right
    after an evaluation, and early stopping compares with the best checkpoint's value."""
    setting = (
        f"train.early_stopping_patience={t.early_stopping_patience}"
        if t.early_stopping_patience > 0
        else (
            "train.load_best_model_at_end=true"
            if t.load_best_model_at_end
            else f"train.metric_for_best_model={metric}"
        )
    )
    if t.eval_steps == 0:
        raise ConfigError(
            f"{setting} needs evaluations during training, but train.eval_steps=0 evaluates "
            "only once, at the end: set train.eval_steps (and train.save_steps to the same "
            "or a multiple)."
        )
    if t.save_steps == 0 or t.save_steps % t.eval_steps:
        raise ConfigError(
            f"{setting}: train.save_steps={t.save_steps} must be a multiple of "
            f"train.eval_steps={t.eval_steps}: a checkpoint is ranked only when it is saved "
            "right after an evaluation (0 saves only the last step)."
        )
    if t.early_stopping_patience > 0:
        if not t.load_best_model_at_end:
            raise ConfigError(
                f"{setting} needs train.load_best_model_at_end=true: PaddleNLP's "
                "EarlyStoppingCallback compares each evaluation with the best checkpoint, "
                "and a run stopped early should end with that checkpoint's weights."
            )
        if t.save_steps != t.eval_steps:
            raise ConfigError(
                f"{setting}: train.save_steps={t.save_steps} must equal train.eval_steps="
                f"{t.eval_steps}: PaddleNLP's EarlyStoppingCallback compares with the best "
                "checkpoint's value, which only a save after every evaluation keeps current."
            )
