"""What PaddleNLP's Trainer offers beyond the basics, in one table each: optimizers,
recompute granularities and refined-recompute ops, trackers.

Validation checks settings against these tables, the plan reads an optimizer's state
layout from ``OPTIMIZERS``, and the TrainingArguments mapping passes the names through
unchanged (they are PaddleNLP's own). No Paddle import: composition, validation and
planning run before anything heavy is loaded. Checked against paddlenlp 3.0.0b4
(``trainer_utils.OptimizerNames``, ``Trainer.get_optimizer_cls_and_kwargs``,
``TrainingArguments.__post_init__``, ``trainer/integrations.py``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ftlab.errors import ConfigError


@dataclass(frozen=True)
class Optimizer:
    """An ``optim`` name and what it keeps per trainable parameter."""

    name: str
    # Optimizer-state elements per trainable parameter (besides the fp32 master copy of
    # 16-bit parameters under AMP O2, which every AdamW variant keeps).
    moments_per_param: float
    # Bytes per moment element: 4 (fp32), or the parameter's own 16-bit width for
    # adamw_16bit_moment when the parameter is 16-bit (fp32 otherwise).
    moments_follow_param_dtype: bool = False
    # The update is Python tensor code (not one fused kernel): it allocates temporaries
    # the size of the parameter being updated, a few at a time.
    python_update: bool = False
    label: str = ""


OPTIMIZERS_TABLE: dict[str, Optimizer] = {
    o.name: o
    for o in (
        Optimizer("adamw", 2, label="AdamW"),
        # One second-moment scalar per parameter tensor (PaddleNLP's AdamWMini).
        Optimizer("adamw_mini", 1, python_update=True, label="AdamW-mini"),
        Optimizer("adamw_custom", 2, python_update=True, label="AdamW (custom)"),
        # PaddleNLP's AdamW_16Bit stores the moments in the parameter's dtype only for
        # 16-bit parameters (with master weights); fp32 parameters keep fp32 moments.
        Optimizer(
            "adamw_16bit_moment",
            2,
            moments_follow_param_dtype=True,
            python_update=True,
            label="AdamW (16-bit moments)",
        ),
    )
}
OPTIMIZERS = tuple(OPTIMIZERS_TABLE)
# Names PaddleNLP's TrainingArguments accepts but its Trainer cannot build (3.0.0b4:
# ``get_optimizer_cls_and_kwargs`` raises "unsupported optimizer" for these).
ACCEPTED_NOT_BUILT = ("adafactor",)

RECOMPUTE_GRANULARITIES = ("full", "full_attn", "core_attn")
# Refined-recompute op names (``TrainingArguments.refined_recompute``). The four linear
# ops act only on tensor-parallel layers; ``flash_attn`` only on flash attention.
REFINED_RECOMPUTE_LINEAR_OPS = (
    "attention_column_ln",
    "attention_row_ln",
    "mlp_column_ln",
    "mlp_row_ln",
)
REFINED_RECOMPUTE_OPS = (*REFINED_RECOMPUTE_LINEAR_OPS, "flash_attn")


@dataclass(frozen=True)
class Tracker:
    name: str  # a ``report_to`` value
    module: str  # the package PaddleNLP's callback imports
    install: str
    # PaddleNLP builds the callback from TrainingArguments.report_to; False: ftlab adds its
    # own (the name must then stay out of report_to: PaddleNLP refuses names it lacks).
    paddlenlp: bool = True


TRACKERS: dict[str, Tracker] = {
    t.name: t
    for t in (
        Tracker("visualdl", "visualdl", "pip install visualdl"),
        Tracker("tensorboard", "tensorboardX", "pip install tensorboardX"),
        Tracker("wandb", "wandb", "pip install wandb"),
        Tracker("mlflow", "mlflow", "pip install mlflow-skinny", paddlenlp=False),
    )
}


def paddlenlp_trackers(names: list[str]) -> list[str]:
    """The ``report_to`` names PaddleNLP's TrainingArguments take (its own callbacks)."""
    return [n for n in names if TRACKERS[n].paddlenlp]


def tracker_available(name: str) -> bool:
    """Whether the package the tracker's PaddleNLP callback imports is installed."""
    return importlib.util.find_spec(TRACKERS[name].module) is not None


def parse_refined_recompute(text: str) -> dict[str, int]:
    """``"op:skip_num,..."`` -> {op: skip_num}, refusing what PaddleNLP would refuse or drop.

    PaddleNLP raises on a missing ``:`` or an unknown op, and reads ``skip_num`` with
    ``int()``; -1 keeps the op's output in every layer, 0 in none, k in the first k.
    """
    out: dict[str, int] = {}
    if not text.strip():
        return out
    for item in text.split(","):
        op, sep, num = item.strip().partition(":")
        if not sep:
            raise ConfigError(
                f"train.refined_recompute={text!r}: {item.strip()!r} is not op:skip_num "
                "(e.g. flash_attn:-1)."
            )
        op = op.strip()
        if op not in REFINED_RECOMPUTE_OPS:
            raise ConfigError(
                f"train.refined_recompute={text!r}: unknown op {op!r}; PaddleNLP refines "
                f"{', '.join(REFINED_RECOMPUTE_OPS)}."
            )
        try:
            skip = int(num)
        except ValueError:
            raise ConfigError(
                f"train.refined_recompute={text!r}: skip_num {num.strip()!r} of {op} is not "
                "an integer (-1: every layer, 0: none, k: the first k layers)."
            ) from None
        if skip < -1:
            raise ConfigError(
                f"train.refined_recompute={text!r}: skip_num {skip} of {op} must be >= -1."
            )
        if op in out:
            raise ConfigError(f"train.refined_recompute={text!r}: {op} is given twice.")
        out[op] = skip
    return out


# --------------------------------------------------------------------------- best checkpoint

# What an evaluation during training computes, by the name ``metric_for_best_model`` takes
# (PaddleNLP adds the ``eval_`` prefix), and whether greater is better. PaddleNLP's
# ``Trainer.evaluate`` returns eval_loss; its SFTTrainer's ``log`` adds eval_ppl to the same
# dict (exp of the loss: it ranks checkpoints as the loss does). PaddleNLP itself would
# take greater_is_better=True for any name but loss, wrong for ppl: ftlab derives it here.
EVAL_METRICS: dict[str, bool] = {"loss": False, "ppl": False}
LIKELIHOOD_ONLY = ("ppl",)  # exp of a DPO/KTO loss is no perplexity; their Trainer omits it
# Metrics ftlab computes once, after training: they cannot rank checkpoints.
FINAL_ONLY_METRICS = ("entity_recall", "bleu4", "rouge1", "rouge2", "rougel")


def best_metric_name(name: str) -> str:
    """``eval_loss`` -> ``loss``: the name without PaddleNLP's optional prefix."""
    return name[len("eval_") :] if name.startswith("eval_") else name


def eval_metrics(likelihood: bool) -> list[str]:
    """The metrics each evaluation during training computes, for a stage."""
    return [m for m in EVAL_METRICS if likelihood or m not in LIKELIHOOD_ONLY]
