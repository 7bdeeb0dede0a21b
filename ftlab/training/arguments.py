"""The run config -> PaddleNLP's TrainingArguments: one mapping for training and export.

``shared_arguments`` holds every setting that means the same to ftlab's Trainer and to
PaddleNLP's ``llm/run_finetune.py`` (batch, optimizer, schedule, precision, parallel
degrees); ``training_arguments`` adds what an ftlab run needs (its run dir, its
evaluation and checkpoint cadence), and ``ftlab.interop.paddlenlp_export`` adds what the script
needs. Neither restates a shared key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftlab.config.schema import PrecisionConfig, RunConfig
from ftlab.config.trainer_options import (
    EVAL_METRICS,
    best_metric_name,
    paddlenlp_trackers,
    parse_refined_recompute,
)
from ftlab.distributed.layout import parallel_training_arguments
from ftlab.errors import ConfigError
from ftlab.record.rundir import CHECKPOINTS, VISUALDL
from ftlab.resolve.best_checkpoint import best_metric

# TrainingArguments keys that carry one ftlab setting unchanged (key -> dotted setting):
# ftlab's Trainer, ``mode=export`` and ``ftlab-import`` all read this one table.
TRAIN_KEYS: dict[str, str] = {
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "per_device_eval_batch_size": "train.per_device_eval_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler_type",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_total_limit": "train.save_total_limit",
    "recompute": "train.recompute",
    "dataloader_num_workers": "train.dataloader_num_workers",
    "load_best_model_at_end": "train.load_best_model_at_end",
    "metric_for_best_model": "train.metric_for_best_model",
    "greater_is_better": "train.greater_is_better",
}


def setting(run: Any, dotted: str) -> Any:
    """The value of a dotted setting (``train.seed``) of a run config."""
    value = run
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# Compute dtype -> the TrainingArguments flag that turns it on; the AMP level's key.
PRECISION_FLAGS = {"bfloat16": "bf16", "float16": "fp16"}
AMP_LEVEL_KEY = "fp16_opt_level"


def precision_arguments(p: PrecisionConfig) -> dict[str, Any]:
    if p.dtype not in PRECISION_FLAGS:
        return {}
    return {PRECISION_FLAGS[p.dtype]: True, AMP_LEVEL_KEY: p.amp_level}


def precision_from_arguments(args: dict[str, Any]) -> tuple[str, str]:
    """The inverse of ``precision_arguments``: (dtype, amp_level) of TrainingArguments."""
    for dtype, flag in PRECISION_FLAGS.items():
        if args.get(flag):
            return dtype, args.get(AMP_LEVEL_KEY) or "O1"
    return "float32", "O0"


def optimizer_arguments(run: RunConfig) -> dict[str, Any]:
    t = run.train
    return {"optim": t.optim, "offload_optim": t.offload_optim}


def recompute_arguments(run: RunConfig) -> dict[str, Any]:
    """The recompute details as TrainingArguments name them (only with recompute on:
    validation refuses them otherwise)."""
    t = run.train
    if not t.recompute:
        return {}
    args: dict[str, Any] = {"recompute_granularity": t.recompute_granularity}
    if t.refined_recompute.strip():
        args["refined_recompute"] = t.refined_recompute
    if t.no_recompute_layers is not None:
        args["no_recompute_layers"] = list(t.no_recompute_layers)
    return args


def recompute_model_config(run: RunConfig) -> dict[str, Any]:
    """Model-config values PaddleNLP's decoder layers read in their constructors.

    ``run_finetune.py`` copies them from its TrainingArguments into the model config
    (``LlmMetaConfig.set_llm_config``) before building the model; ftlab builds the model
    itself, so it passes the same values at load time. ``refined_recompute`` goes in the
    parsed form TrainingArguments turns the string into (op -> skip_num), and a refined op
    acts only when the config says ``recompute`` while the layers are built.
    """
    t = run.train
    if not t.recompute:
        return {}
    out: dict[str, Any] = {
        "recompute": True,
        "recompute_granularity": t.recompute_granularity,
        "no_recompute_layers": list(t.no_recompute_layers or []) or None,
    }
    refined = parse_refined_recompute(t.refined_recompute)
    if refined:
        out["refined_recompute"] = refined
    return out


def shared_arguments(run: RunConfig) -> dict[str, Any]:
    """TrainingArguments keys whose meaning ftlab and run_finetune.py share."""
    return {
        **{key: setting(run, dotted) for key, dotted in TRAIN_KEYS.items()},
        **optimizer_arguments(run),
        **recompute_arguments(run),
        "report_to": paddlenlp_trackers(list(run.train.report_to)),
        **precision_arguments(run.precision),
        **parallel_training_arguments(run.parallel),
        **best_checkpoint_arguments(run),
        **checkpoint_option_arguments(run),
    }


def checkpoint_option_arguments(run: RunConfig) -> dict[str, Any]:
    """PaddleNLP's unified-checkpoint options, when set (validation checked them)."""
    t, out = run.train, {}
    if t.unified_checkpoint_config:
        out["unified_checkpoint_config"] = " ".join(t.unified_checkpoint_config)
    if t.ckpt_quant_stage != "O0":
        out["ckpt_quant_stage"] = t.ckpt_quant_stage
    return out


def best_checkpoint_arguments(run: RunConfig) -> dict[str, Any]:
    """The ranking metric and its direction as validation derived them (PaddleNLP would
    take greater_is_better=True for any metric but loss, ppl included)."""

    metric = best_metric(run.train)
    if metric is None:
        return {}
    return {
        "metric_for_best_model": metric,
        "greater_is_better": EVAL_METRICS[best_metric_name(metric)],
    }


def total_steps(run: RunConfig, num_train_examples: int | None, global_batch: int) -> int:
    if run.train.max_steps > 0:
        return run.train.max_steps
    assert num_train_examples is not None, "streaming data requires train.max_steps"
    per_epoch = max(math.ceil(num_train_examples / global_batch), 1)
    return math.ceil(per_epoch * run.train.num_train_epochs)


def training_arguments(
    run: RunConfig, run_dir: Path, steps: int, has_eval: bool, unified_checkpoint: bool = True
) -> Any:
    """PaddleNLP's ``SFTConfig`` for a run of ``steps`` optimizer steps in ``run_dir``."""
    from paddlenlp.trl import SFTConfig

    t = run.train
    args = shared_arguments(run)
    if args.get("metric_for_best_model") and not has_eval:
        raise ConfigError(
            f"train.metric_for_best_model={args['metric_for_best_model']} (best checkpoint / "
            "early stopping) needs evaluations, but the run has no dev split: give one "
            "(dev.json, data.dev_path or data.dev_from_train) or unset these settings."
        )
    if run.parallel.pipeline > 1:
        # ftlab pads each batch to its longest sequence, so activations between stages
        # change shape from batch to batch (and between the micro-batches of one step):
        # the stages must exchange shapes every time, not cache the first batch's.
        args["pipeline_parallel_config"] = "disable_p2p_cache_shape"
    return SFTConfig(
        output_dir=str(run_dir / CHECKPOINTS),
        logging_dir=str(run_dir / VISUALDL),
        do_train=True,
        # PaddleNLP turns do_eval=True into evaluation every logging step; ftlab evaluates
        # at train.eval_steps when set, and always once at the end (training.stages).
        do_eval=bool(has_eval and t.eval_steps),
        max_steps=steps,
        evaluation_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps",
        save_steps=t.save_steps or steps,
        unified_checkpoint=unified_checkpoint,
        remove_unused_columns=False,
        # ftlab's console shows one progress bar (training.trainer.ConsoleProgress);
        # PaddleNLP's then logs its lines to train.log instead of drawing its own bars.
        disable_tqdm=True,
        **args,
    )
