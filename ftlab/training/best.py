"""The best checkpoint and early stopping in a run (settings: ``resolve.best_checkpoint``).

PaddleNLP does the work: its Trainer ranks each checkpoint saved after an evaluation,
loads the best at the end of ``train()`` (``load_best_model_at_end``) and its
``EarlyStoppingCallback`` stops training. This module adds the callback when asked and
reads back what happened for the summary: the best step and value, whether ``final/`` holds
the best checkpoint's weights, and the step at which the run stopped early.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftlab.config.schema import RunConfig
from ftlab.record.resume import checkpoint_step


def early_stopping_callbacks(run: RunConfig) -> list[Any]:
    """PaddleNLP's ``EarlyStoppingCallback`` when ``train.early_stopping_patience`` > 0."""
    t = run.train
    if t.early_stopping_patience <= 0:
        return []
    from paddlenlp.trainer import EarlyStoppingCallback

    return [EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold)]


def best_record(run: RunConfig, trainer: Any) -> dict[str, Any]:
    """The best checkpoint as ``summary.json`` records it ({} when nothing ranks them)."""
    state, args = trainer.state, trainer.args
    if args.metric_for_best_model is None or state.best_model_checkpoint is None:
        return {}
    value = float(state.best_metric)
    record: dict[str, Any] = {
        "metric": args.metric_for_best_model,
        "greater_is_better": bool(args.greater_is_better),
        "value": value,
        "step": checkpoint_step(Path(state.best_model_checkpoint)),
        "checkpoint": str(state.best_model_checkpoint),
        "loaded_into_final": bool(args.load_best_model_at_end),
    }
    if args.metric_for_best_model in ("loss", "eval_loss") and run.stage.name == "sft":
        record["ppl"] = math.exp(value)
    return record


def stopped_early_at(run: RunConfig, steps: int, total_steps: int | None) -> int | None:
    """The step early stopping ended the run at (None: it ran every step)."""
    if run.train.early_stopping_patience <= 0 or total_steps is None or steps >= total_steps:
        return None
    return steps
