"""Disk: what a run's checkpoints and ``final/`` take, and whether ``launch.disk_gib`` holds it.

A checkpoint is what PaddleNLP 3.0.0b4's unified checkpoint (or, for the methods that
save their own state, ftlab's safetensors) writes per save, summed over ranks (a unified
checkpoint is merged, so its size does not depend on the layout, except the RNG state,
one file per rank):

* weights: the trainable parameters (all of them for full fine-tuning), in their dtype
  (16-bit under AMP O2, fp32 otherwise; an fp32 adapter stays fp32);
* optimizer: the moments (``OPTIMIZERS`` says how many per parameter and in which dtype)
  and the fp32 master weights AMP O2 keeps of 16-bit trainable parameters;
* per tensor: the safetensors header and index entries of the weight and of its
  optimizer states (measured, below);
* RNG state (ftlab's JSON, one per rank), the tokenizer files (measured in the model dir
  when it is local), configs and the trainer state.

``train.save_total_limit`` keeps the newest N checkpoints plus the best one (when
``train.metric_for_best_model`` ranks them), so at most N + 1 at once; ``final/`` adds
the weights once more with the tokenizer. PaddleNLP's unified-checkpoint options act in
multi-process runs only (3.0.0b4 saves a one-process checkpoint whole,
``save_single_card_checkpoint``): ``skip_save_model_weight`` drops the weights when
master weights exist, ``remove_master_weight`` drops the master weights,
``ckpt_quant_stage`` O1/O2 stores the optimizer moments as int8/int4, and
``async_save`` changes when, not how much.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config.schema import RunConfig
from ftlab.config.trainer_options import OPTIMIZERS_TABLE
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method
from ftlab.models.arch import base_counts
from ftlab.models.hub_cache import local_model_dir
from ftlab.resolve.best_checkpoint import best_metric

GIB = 1024**3
# Measured on a stories260k LoRA checkpoint (70 tensors, names ~60 characters): header +
# index bytes per weight tensor, and per trainable tensor for its optimizer states
# (moment1, moment2, beta1_pow_acc, beta2_pow_acc entries).
WEIGHT_TENSOR_BYTES = 192
OPTIMIZER_TENSOR_BYTES = 858
RNG_BYTES_PER_RANK = 65_791  # rng_state.rank<N>.json: Python, NumPy and Paddle generators
# config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json,
# the method's config, trainer_state.json, training_args.bin, scheduler.json (measured).
CHECKPOINT_METADATA_BYTES = 6_600
FINAL_METADATA_BYTES = 6_100
TRAINER_STATE_BYTES_PER_LOG = 250  # trainer_state.json's log_history grows per log
TOKENIZER_FILES = (
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# PaddleNLP's unified_checkpoint_config values with an effect ftlab knows (3.0.0b4).
UNIFIED_OPTIONS = ("async_save", "skip_save_model_weight", "remove_master_weight")
CKPT_QUANT_STAGES = {"O0": None, "O1": 1.0, "O2": 0.5}  # bytes per optimizer moment


@dataclass
class DiskEstimate:
    """Bytes one checkpoint takes, how many are kept at once, and ``final/``."""

    weights: int
    optimizer: int
    master_weights: int
    tensor_overhead: int
    rng: int
    tokenizer: int
    metadata: int
    per_checkpoint: int
    saves: int | None  # checkpoints the run writes (None: set by the data, unknown here)
    kept: int | None  # at most this many exist at once
    final: int
    total: int | None
    budget: int | None = None  # bytes free for the run (launch.disk_gib or probed)
    budget_source: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_checkpoint_options(run: RunConfig, world_size: int) -> None:
    """``train.unified_checkpoint_config`` / ``train.ckpt_quant_stage``: known values, and a
    run in which PaddleNLP applies them (a unified checkpoint written by several ranks)."""
    t = run.train
    for option in t.unified_checkpoint_config:
        if option not in UNIFIED_OPTIONS:
            raise ConfigError(
                f"train.unified_checkpoint_config: unknown option {option!r}; ftlab passes "
                f"{', '.join(UNIFIED_OPTIONS)} to PaddleNLP."
            )
    if len(set(t.unified_checkpoint_config)) != len(t.unified_checkpoint_config):
        raise ConfigError("train.unified_checkpoint_config: an option is listed twice.")
    if t.ckpt_quant_stage not in CKPT_QUANT_STAGES:
        raise ConfigError(
            f"train.ckpt_quant_stage={t.ckpt_quant_stage}: choose O0 (off), O1 (int8 optimizer "
            "moments) or O2 (int4)."
        )
    asked = [f"unified_checkpoint_config={list(t.unified_checkpoint_config)}"] * bool(
        t.unified_checkpoint_config
    ) + [f"ckpt_quant_stage={t.ckpt_quant_stage}"] * (t.ckpt_quant_stage != "O0")
    if not asked:
        return
    setting = "train." + " and train.".join(asked)
    if not get_method(run.method.name).unified_checkpoint:
        raise ConfigError(
            f"{setting}: method={run.method.name} saves its own checkpoint (not PaddleNLP's "
            "unified checkpoint), which these options do not act on. Remove them."
        )
    if world_size <= 1:
        raise ConfigError(
            f"{setting}: PaddleNLP 3.0.0b4 saves a one-process checkpoint whole "
            "(save_single_card_checkpoint), so these options would change nothing in this "
            "run. Remove them, or use a layout with several ranks."
        )
    if t.ckpt_quant_stage != "O0" and not t.optim.startswith("adamw"):
        raise ConfigError(f"train.ckpt_quant_stage={t.ckpt_quant_stage}: needs an AdamW optimizer.")


def _tokenizer_bytes(run: RunConfig) -> tuple[int, str | None]:
    """Bytes of the tokenizer files in the model dir (0 and a note when not local)."""
    name = run.model.tokenizer_name_or_path or run.model.name_or_path
    where = local_model_dir(name)  # a cached hub snapshot counts as local
    if where is None:
        return 0, f"tokenizer files not counted ({name} is not a local dir)"
    return sum((where / n).stat().st_size for n in TOKENIZER_FILES if (where / n).is_file()), None


def _saved_tensors(run: RunConfig, trains_base: bool, targets: int) -> int:
    """Trainable tensors a checkpoint names: LoRA-like adapters two per adapted linear;
    full fine-tuning every weight (7 linears and 2 norms per layer, embedding, norm, head)."""
    layers = run.model.arch.num_hidden_layers
    return layers * 9 + 3 if trains_base else 2 * layers * max(targets, 1)


def estimate_disk(run: RunConfig, world_size: int, total_steps: int | None) -> DiskEstimate:
    """The checkpoint, ``final/`` and run totals (see the module docstring)."""
    plan = get_method(run.method.name).plan(run)
    base = base_counts(run.model)
    trainable = base.total if plan.trains_base else plan.adapter
    t, p = run.train, run.precision
    half = p.amp_level == "O2" and p.dtype != "float32"
    weight_b = 4 if (plan.adapter_fp32 or not half) else 2
    saved_params = trainable
    if plan.trains_base and run.model.arch.tie_word_embeddings:
        # A tied LM head is written under its own name too (measured: stories260k full
        # fine-tuning saves lm_head.weight beside the embedding); the optimizer keeps one.
        saved_params += base.embedding
    options = set(t.unified_checkpoint_config) if world_size > 1 else set()
    quant = CKPT_QUANT_STAGES[t.ckpt_quant_stage] if world_size > 1 else None
    opt = OPTIMIZERS_TABLE[t.optim]
    moment_b = weight_b if (opt.moments_follow_param_dtype and weight_b == 2) else 4
    moment_b = quant if quant is not None else moment_b
    masters = trainable * 4 if weight_b == 2 else 0
    notes: list[str] = []
    if masters and "remove_master_weight" in options:
        masters = 0
        notes.append("remove_master_weight: no fp32 master weights in checkpoints")
    weights = saved_params * weight_b
    final_weights = weights
    if "skip_save_model_weight" in options and weight_b == 2:
        weights = 0  # resumed from the master weights
        notes.append("skip_save_model_weight: checkpoints hold no model weights")
    if quant is not None:
        notes.append(f"ckpt_quant_stage={t.ckpt_quant_stage}: optimizer moments {quant:g} byte")
    optimizer = math.ceil(trainable * opt.moments_per_param * moment_b)
    tensors = _saved_tensors(run, plan.trains_base, len(plan.targets))
    overhead = tensors * (OPTIMIZER_TENSOR_BYTES + (WEIGHT_TENSOR_BYTES if weights else 0))
    tokenizer, note = _tokenizer_bytes(run)
    if note:
        notes.append(note)
    logs = math.ceil(total_steps / max(t.logging_steps, 1)) if total_steps else 0
    metadata = CHECKPOINT_METADATA_BYTES + logs * TRAINER_STATE_BYTES_PER_LOG
    rng = RNG_BYTES_PER_RANK * world_size
    per = weights + optimizer + masters + overhead + rng + tokenizer + metadata
    saves = None
    if total_steps:
        saves = math.ceil(total_steps / t.save_steps) if t.save_steps else 1
    kept = _kept(run, saves)
    final = final_weights + tensors * WEIGHT_TENSOR_BYTES + tokenizer + FINAL_METADATA_BYTES
    total = None if kept is None else kept * per + final
    return DiskEstimate(
        weights=weights,
        optimizer=optimizer,
        master_weights=masters,
        tensor_overhead=overhead,
        rng=rng,
        tokenizer=tokenizer,
        metadata=metadata,
        per_checkpoint=per,
        saves=saves,
        kept=kept,
        final=final,
        total=total,
        notes=notes,
    )


def _kept(run: RunConfig, saves: int | None) -> int | None:
    """Checkpoints on disk at once: the newest save_total_limit, plus the best one."""
    limit = run.train.save_total_limit
    if limit <= 0:
        return saves  # every checkpoint is kept

    most = limit + (1 if best_metric(run.train) is not None else 0)
    return most if saves is None else min(saves, most)


def disk_budget(run: RunConfig, described: bool, where: Path) -> tuple[int | None, str]:
    """(bytes free for the run, where the figure comes from): ``launch.disk_gib``, else
    the free space of ``where``'s file system on this machine (None for a described one)."""
    if run.launch.disk_gib is not None:
        return int(run.launch.disk_gib * GIB), "launch.disk_gib"
    if described:
        return None, "unknown for the target (set launch.disk_gib)"
    probe = where if where.exists() else Path.cwd()
    return shutil.disk_usage(probe).free, f"free on {probe} (probed)"


def with_budget(est: DiskEstimate, budget: tuple[int | None, str]) -> DiskEstimate:
    est.budget, est.budget_source = budget
    return est


def disk_warning(est: DiskEstimate) -> str | None:
    """One line when the run's checkpoints and final/ would not fit the budget."""
    if est.budget is None or est.total is None or est.total <= est.budget:
        return None
    return (
        f"disk: checkpoints ({est.kept} x {human(est.per_checkpoint)}) + final/ need "
        f"{human(est.total)}, more than the {human(est.budget)} {est.budget_source}. Lower "
        "train.save_total_limit, save less often (train.save_steps), or free space."
    )


def disk_lines(est: DiskEstimate) -> list[str]:
    """The plan's ``disk`` line (and the details under it)."""
    parts = [f"weights {human(est.weights)}", f"optimizer {human(est.optimizer)}"]
    if est.master_weights:
        parts.append(f"master weights {human(est.master_weights)}")
    parts.append(f"rng {human(est.rng)}")
    other = est.tensor_overhead + est.tokenizer + est.metadata
    parts.append(f"tokenizer, configs, headers {human(other)}")
    if est.total is None:
        head = f"{human(est.per_checkpoint)} per checkpoint (how many: set by the data)"
    else:
        head = (
            f"{human(est.total)} = {est.kept} kept x {human(est.per_checkpoint)} per "
            f"checkpoint + final/ {human(est.final)}"
        )
    lines = [f"disk           {head}", f"               checkpoint: {', '.join(parts)}"]
    if est.budget is not None:
        lines.append(f"               budget {human(est.budget)} ({est.budget_source})")
    lines += [f"               {n}" for n in est.notes]
    return lines


def human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def plan_disk(run: RunConfig, world_size: int, described: bool, where: Path) -> DiskEstimate:
    """The estimate with its budget, for the plan and for ``parallel=auto``'s choice."""
    steps = run.train.max_steps if run.train.max_steps > 0 else None
    return with_budget(estimate_disk(run, world_size, steps), disk_budget(run, described, where))
