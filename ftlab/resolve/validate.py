"""Cross-group validation, run once before any model or data is loaded.

Every check raises ``ConfigError`` with a message that names the setting, says why it
cannot work, and what to do instead. Nothing is reset silently: values ftlab computes
(data-parallel degree, global batch, the method's own values such as LoRA's alpha) are
returned as a frozen ``Derived`` and written into the run's resolved config. What a
method, a stage, a model family or the data settings require is asked of them
(``Method.check``, ``Stage.check``, the family table, ``check_data_settings``); nothing here
names a method, a stage or a family.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ftlab.config.choices import check_choice
from ftlab.config.cpu_runtime import available_cores, resolve_cpu_threads
from ftlab.config.derived import Derived
from ftlab.config.environment import Environment, target_environment
from ftlab.config.schema import AutoLayoutSettings, LaunchConfig, RunConfig
from ftlab.config.trainer_options import (
    ACCEPTED_NOT_BUILT,
    OPTIMIZERS,
    RECOMPUTE_GRANULARITIES,
    REFINED_RECOMPUTE_LINEAR_OPS,
    TRACKERS,
    parse_refined_recompute,
    tracker_available,
)
from ftlab.data.formats import TEXT_FORMATS
from ftlab.data.settings import check_data_settings, mixture_weights
from ftlab.distributed.degrees import Degrees
from ftlab.distributed.emulation import check_emulation
from ftlab.distributed.layout import parallel_degrees, processes_per_node
from ftlab.errors import ConfigError, DataError
from ftlab.methods.catalog import get_method
from ftlab.methods.registry import Method
from ftlab.models.attention import attention_path
from ftlab.models.families import FAMILIES, family
from ftlab.models.rope import STATIC_STRATEGIES, STRATEGIES, context_length
from ftlab.planning.disk import check_checkpoint_options
from ftlab.resolve.best_checkpoint import check_best_checkpoint
from ftlab.stages.catalog import get_stage
from ftlab.stages.init import inspect_init

# Allowed values of the run's string-typed settings (the data group keeps its own, in
# ``ftlab.data.settings``; the method's are checked by the method).
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("train", "plan", "export"),
    "device": ("auto", "cpu", "gpu"),
    "precision.dtype": ("float32", "bfloat16", "float16"),
    "precision.amp_level": ("O0", "O1", "O2"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup"),
    "train.optim": (*OPTIMIZERS, *ACCEPTED_NOT_BUILT),
    "train.recompute_granularity": RECOMPUTE_GRANULARITIES,
    "eval.decode_strategy": ("greedy", "sampling"),
    "eval.metric_tokens": ("auto", "char", "word"),
    "model.rope_scaling.strategy": tuple(STRATEGIES),
}


def _lookup(run: RunConfig, dotted: str) -> Any:
    obj: Any = run
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def check_choices(run: RunConfig) -> None:
    for key, choices in CHOICES.items():
        value = _lookup(run, key)
        if value is not None:
            check_choice(key, value, choices)
    check_choice("model.family", run.model.family, tuple(FAMILIES))


# Numeric settings and the lowest value that can work: (setting, lowest, lowest allowed?,
# what the value means at the edge). Checked before anything else: a zero batch size or a
# negative learning rate would otherwise fail deep inside PaddleNLP after the data load.
RANGES: tuple[tuple[str, float, bool, str], ...] = (
    ("train.learning_rate", 0, False, ""),
    ("train.per_device_train_batch_size", 1, True, ""),
    ("train.per_device_eval_batch_size", 1, True, ""),
    ("train.gradient_accumulation_steps", 1, True, ""),
    ("train.warmup_steps", 0, True, ""),
    ("train.weight_decay", 0, True, ""),
    ("train.max_grad_norm", 0, True, " (0 turns clipping off)"),
    ("train.seed", 0, True, ""),
    ("train.logging_steps", 1, True, ""),
    ("train.eval_steps", 0, True, " (0 evaluates once, at the end)"),
    ("train.save_steps", 0, True, " (0 saves one checkpoint, at the end)"),
    ("train.dataloader_num_workers", 0, True, ""),
    ("eval.max_new_tokens", 1, True, ""),
    ("eval.num_samples", 0, True, ""),
    ("eval.batch_size", 1, True, ""),
    ("parallel.tensor", 1, True, ""),
    ("parallel.pipeline", 1, True, ""),
    ("parallel.sharding", 1, True, ""),
    ("parallel.data", 1, True, " (or leave it unset to derive it)"),
    ("parallel.nproc_per_node", 1, True, " (or leave it unset to derive it)"),
    ("launch.nnodes", 1, True, ""),
    ("launch.rendezvous_timeout", 0, False, " (seconds the nodes wait for each other)"),
)
SEED_LIMIT = 2**32  # NumPy's seeds are 32-bit
ROPE_FACTOR_MAX = 256  # published long-context recipes scale by 2-64; 1e9 asked for 2 TB
# Python's threading timeout (the rendezvous watchdog) overflows past ~9e9 s: a week is
# more than any node should be waited for.
RENDEZVOUS_TIMEOUT_MAX = 7 * 24 * 3600


def check_ranges(run: RunConfig) -> None:
    """Every numeric setting within what can work, before anything is loaded."""
    for key, lowest, allowed, note in RANGES:
        value = _lookup(run, key)
        if value is None:
            continue
        if not math.isfinite(value) or value < lowest or (value == lowest and not allowed):
            bound = f">= {lowest}" if allowed else f"> {lowest}"
            raise ConfigError(f"{key}={value}: must be a number {bound}{note}.")
    t = run.train
    if t.seed >= SEED_LIMIT:
        raise ConfigError(f"train.seed={t.seed}: must be below 2**32 (NumPy's seed range).")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(
            f"train.max_steps={t.max_steps}: give a number of optimizer steps >= 1, or -1 to "
            "train for train.num_train_epochs epochs."
        )
    if t.max_steps == -1 and not (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0):
        raise ConfigError(
            f"train.num_train_epochs={t.num_train_epochs} with train.max_steps=-1: there would "
            "be nothing to train. Give num_train_epochs > 0, or train.max_steps >= 1."
        )
    if t.save_total_limit == 0 or t.save_total_limit < -1:
        raise ConfigError(
            f"train.save_total_limit={t.save_total_limit}: keep at least 1 checkpoint (2 lets "
            "a resume fall back when the newest is damaged), or -1 to keep every one."
        )
    if run.launch.rendezvous_timeout > RENDEZVOUS_TIMEOUT_MAX:
        raise ConfigError(
            f"launch.rendezvous_timeout={run.launch.rendezvous_timeout}: at most "
            f"{RENDEZVOUS_TIMEOUT_MAX} seconds (a week); the nodes' wait must end."
        )
    if run.parallel.sharding_stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"parallel.sharding_stage={run.parallel.sharding_stage}: choose 0 (off), 1, 2 or 3."
        )


def check_precision(run: RunConfig, env: Environment) -> None:
    p = run.precision
    if p.dtype == "float32" and p.amp_level != "O0":
        raise ConfigError(
            f"precision.amp_level={p.amp_level} with precision.dtype=float32: AMP needs a "
            "16-bit dtype. Use precision=bf16 or precision=fp16, or amp_level=O0."
        )
    if p.dtype != "float32" and p.amp_level == "O0":
        raise ConfigError(
            f"precision.dtype={p.dtype} with amp_level=O0: choose O1 (mixed) or O2 (pure)."
        )
    if p.dtype == "float32":
        return
    if env.device == "cpu":
        raise ConfigError(
            f"precision={p.name} ({p.dtype}): CPU runs compute in float32 only. "
            "PaddlePaddle silently ignores bf16 AMP on CPU and crashes on fp16. "
            "Use precision=fp32 on CPU, or run on a GPU."
        )
    if p.dtype == "bfloat16" and env.gpu_compute_capability and env.gpu_compute_capability < (8, 0):
        cap = ".".join(map(str, env.gpu_compute_capability))
        raise ConfigError(
            f"precision={p.name}: bfloat16 needs compute capability >= 8.0 (Ampere); this "
            f"GPU has {cap}. Use precision=fp16 instead."
        )


def check_model(run: RunConfig, env: Environment) -> None:
    m, d = run.model, run.data
    fam = family(m.family)
    check_context(run)
    if d.format not in TEXT_FORMATS and d.src_length >= d.max_length:
        raise ConfigError(
            f"data.src_length={d.src_length} must be below data.max_length={d.max_length}: "
            "no room would be left for the target."
        )
    if m.arch.tie_word_embeddings and not fam.ties_embeddings and not fam.tied_head_copy:
        raise ConfigError(
            f"model.arch.tie_word_embeddings=true: PaddleNLP 3.0.0b4's {fam.name} model "
            f"({fam.causal_lm_class}) never ties its output layer to the embedding, so a tied "
            "checkpoint would leave its output layer at random initialisation. Use an "
            "untied checkpoint of this family."
        )
    if m.flash_attention and not fam.flash_attention:
        raise ConfigError(
            f"model.flash_attention=true with model.family={m.family}: "
            f"{fam.flash_attention_reason or 'PaddleNLP has no flash-attention path for it'}. "
            "Set model.flash_attention=false."
        )
    if m.flash_attention and env.device == "cpu" and env.paddle_version.startswith("3.0"):
        raise ConfigError(
            f"model.flash_attention=true: PaddlePaddle {env.paddle_version} has no CPU flash "
            "attention kernel. Set model.flash_attention=false, or use paddlepaddle>=3.3."
        )


def check_context(run: RunConfig) -> None:
    """RoPE scaling and the context it gives: ``data.max_length`` must fit in it."""
    m, d = run.model, run.data
    rs, native = m.rope_scaling, m.arch.max_position_embeddings
    if rs.strategy is None and rs.factor != 1.0:
        raise ConfigError(
            f"model.rope_scaling.factor={rs.factor} without model.rope_scaling.strategy has "
            f"no effect. Choose a strategy ({'|'.join(STRATEGIES)}) or leave the factor at 1."
        )
    if rs.strategy is not None:
        if not family(m.family).rope_scaling:
            raise ConfigError(
                f"model.rope_scaling.strategy={rs.strategy}: ftlab scales RoPE through "
                "PaddleNLP's long-sequence strategies for "
                f"{', '.join(n for n, f in FAMILIES.items() if f.rope_scaling)} only, not "
                f"{m.family} (its attention does not build them, has no rotary table, or "
                "is untested). Set model.rope_scaling.strategy=null."
            )
        if not (math.isfinite(rs.factor) and 1.0 <= rs.factor <= ROPE_FACTOR_MAX):
            rule = (
                "must be at least 1"  # (nan and inf are not < 1: they get the range)
                if rs.factor < 1
                else f"must be a number from 1 to {ROPE_FACTOR_MAX}"
            )
            raise ConfigError(
                f"model.rope_scaling.factor={rs.factor} {rule}: the scaled context is "
                f"model.arch.max_position_embeddings ({native}) x factor, and its rotary "
                "tables are built for all of it."
            )
    context = context_length(m)
    if context is None or d.max_length <= context:  # None: ALiBi, no fixed context
        return
    need = -(-d.max_length // native)
    if rs.strategy is None:
        scale = (
            f", or scale RoPE: model.rope_scaling.strategy=linear model.rope_scaling.factor="
            f"{need} (or ntk, dynamic_ntk, yarn) gives {native * need} positions"
            if family(m.family).rope_scaling
            else ""
        )
        raise ConfigError(
            f"data.max_length={d.max_length} exceeds model {m.name}'s context of {native} "
            f"tokens (model.arch.max_position_embeddings). Lower data.max_length{scale}."
        )
    raise ConfigError(
        f"data.max_length={d.max_length} exceeds the scaled context of {context} tokens "
        f"(model.arch.max_position_embeddings {native} x model.rope_scaling.factor "
        f"{rs.factor}). Raise model.rope_scaling.factor to at least {need}, or lower "
        "data.max_length."
    )


def check_long_sequences(run: RunConfig, method: Method) -> None:
    """``model.flash_mask`` and ``data.pose`` against the model, the layout and the method."""
    m, d = run.model, run.data
    if m.flash_mask:
        if not m.flash_attention:
            raise ConfigError(
                "model.flash_mask=true needs model.flash_attention=true: FlashMask is a flash "
                "attention kernel, and PaddleNLP's eager attention ignores the indices (its "
                "examples would attend to each other). Set model.flash_attention=true, or "
                "model.flash_mask=false for the dense mask."
            )
        if not family(m.family).flash_mask:
            raise ConfigError(
                f"model.flash_mask=true: PaddleNLP's {m.family} models do not accept "
                "attn_mask_startend_row_indices (FlashMask: "
                f"{', '.join(n for n, f in FAMILIES.items() if f.flash_mask)}). Set "
                "model.flash_mask=false: packed batches then carry a dense mask."
            )
        if d.packing == "none":
            raise ConfigError(
                "model.flash_mask=true with data.packing=none has no effect: unpacked rows "
                "need no block mask (flash attention's causal mode covers them). Set "
                "data.packing=greedy or zero_padding to pack, or model.flash_mask=false."
            )
        if method.flash_mask_unsupported:
            raise ConfigError(
                f"model.flash_mask=true with method={run.method.name}: "
                f"{method.flash_mask_unsupported}. Set model.flash_mask=false."
            )
    if d.pose:
        strategy = m.rope_scaling.strategy
        if strategy not in STATIC_STRATEGIES:
            raise ConfigError(
                f"data.pose=true needs model.rope_scaling.strategy={'|'.join(STATIC_STRATEGIES)}"
                f" (it is {strategy}): PaddleNLP's plain RoPE and dynamic NTK compute the "
                "rotary table only up to the batch's own length, and PoSE's skipped position "
                "ids go past it. factor=1 keeps the pretrained context."
            )
        context = context_length(m)
        if d.max_length >= context:
            raise ConfigError(
                f"data.pose=true with data.max_length={d.max_length} and a context of "
                f"{context}: PoSE trains a context longer than the rows, and these rows "
                "already span it. Raise model.rope_scaling.factor or lower data.max_length."
            )


def check_data(run: RunConfig) -> None:
    try:
        check_data_settings(run.data, run.train.max_steps)
    except DataError as err:  # a setting, not a file: reported as the config error it is
        raise ConfigError(str(err)) from None


def check_parallel(run: RunConfig, env: Environment) -> Degrees:
    """Check the layout against the devices and the model; return the derived degrees."""
    degrees = _derived_degrees(run)
    check_combination(run, degrees.data)
    p = run.parallel
    if degrees.nproc_per_node > env.device_count:
        unit = "GPUs" if env.device == "gpu" else "CPU cores (one gloo process each)"
        raise ConfigError(
            f"parallel={p.name} needs {degrees.nproc_per_node} processes per node but this "
            f"machine has {env.device_count} {unit}. Use a smaller layout (e.g. "
            "parallel=single) or more devices."
        )
    check_expert_parallel(run, env, degrees.data)
    check_model_split(run)
    if env.device == "cpu" and p.cpu_emulation:
        check_emulation(run)  # refuses the layouts the CPU emulation cannot run
    elif env.device == "cpu" and (p.tensor > 1 or p.pipeline > 1 or p.sharding_stage in (2, 3)):
        raise ConfigError(
            f"parallel={p.name} (tensor {p.tensor}, pipeline {p.pipeline}, sharding stage "
            f"{p.sharding_stage}): PaddlePaddle's CPU build cannot run tensor, pipeline or "
            "sharding stage 2/3 layouts. Run it on GPUs, or use parallel=dp2 / "
            "sharding_stage1 on CPU; to test a tensor- or pipeline-parallel layout on CPU, "
            "add parallel.cpu_emulation=true (slow, for correctness checks)."
        )
    return degrees


def _derived_degrees(run: RunConfig) -> Degrees:
    """The degrees on ``launch.nnodes`` nodes, the data degree derived from the world size
    (which the other degrees must divide; ``parallel.data``, when set, must equal it)."""
    p, launch = run.parallel, run.launch
    degrees = parallel_degrees(p, launch.nnodes)
    nproc, world, dp = degrees.nproc_per_node, degrees.world_size, degrees.data
    model_parallel = degrees.model_parallel_size * p.sharding
    if world % model_parallel:
        raise ConfigError(
            f"parallel={p.name}: world size {world} (nnodes {launch.nnodes} x nproc_per_node "
            f"{nproc}) is not a multiple of tensor {p.tensor} x pipeline {p.pipeline} x "
            f"sharding {p.sharding} = {model_parallel}."
        )
    if p.data is not None and p.data != dp:
        nodes = (
            f" ({launch.nnodes} nodes x {nproc} processes per node; parallel.nproc_per_node "
            "sets the processes per node)"
            if launch.nnodes > 1
            else ""
        )
        raise ConfigError(
            f"parallel.data={p.data} does not match world size {world}{nodes} / (tensor x "
            f"pipeline x sharding = {model_parallel}) = {dp}. Leave parallel.data unset to "
            "derive it."
        )
    return degrees


def check_model_split(run: RunConfig) -> None:
    """The model splits as the tensor and pipeline degrees ask: PaddleNLP has the family's
    tensor-parallel layers / pipeline model, and the degrees divide its heads, widths and
    layers."""
    p, arch = run.parallel, run.model.arch
    fam = family(run.model.family)
    if p.tensor > 1 and not fam.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor={p.tensor}: PaddleNLP has no tensor-parallel layers for "
            f"model.family={fam.name}. Use a sharding or data-parallel layout."
        )
    if p.tensor > 1 and (
        arch.num_attention_heads % p.tensor or arch.num_key_value_heads % p.tensor
    ):
        raise ConfigError(
            f"parallel.tensor={p.tensor} must divide the attention heads "
            f"({arch.num_attention_heads}) and key/value heads "
            f"({arch.num_key_value_heads}) of model {run.model.name}."
        )
    widths = {"intermediate_size": arch.intermediate_size}
    if arch.num_experts and fam.moe is not None and fam.moe.tensor_parallel_experts:
        widths["moe_intermediate_size"] = arch.moe_intermediate_size
    if arch.shared_expert_intermediate_size:
        widths["shared_expert_intermediate_size"] = arch.shared_expert_intermediate_size
    for key, width in widths.items():
        if p.tensor > 1 and width and width % p.tensor:
            raise ConfigError(
                f"parallel.tensor={p.tensor} must divide model.arch.{key}={width} of model "
                f"{run.model.name}: tensor parallelism splits those columns evenly."
            )
    if p.pipeline > 1 and fam.pipeline_class is None:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline}: PaddleNLP has no pipeline model for "
            f"model.family={fam.name}. Use a tensor, sharding or data-parallel layout."
        )
    # PaddleNLP's pipeline models split evenly when the stages divide the layers, and
    # otherwise spread embedding, layers, norm and head uniformly; each stage needs a layer.
    if p.pipeline > 1 and arch.num_hidden_layers < p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} exceeds model {run.model.name}'s "
            f"{arch.num_hidden_layers} layers: every stage needs at least one. "
            "Use fewer pipeline stages."
        )


# --------------------------------------------------------------------------- optimizer,
# recompute detail, trackers, generation metrics


def check_optimizer(run: RunConfig, env: Environment) -> None:
    t, p = run.train, run.parallel
    if t.optim in ACCEPTED_NOT_BUILT:
        raise ConfigError(
            f"train.optim={t.optim}: PaddleNLP's TrainingArguments accept the name but its "
            "Trainer has no implementation (it raises 'unsupported optimizer' when the "
            f"optimizer is built). Use one of {', '.join(OPTIMIZERS)}."
        )
    if t.optim == "adamw_mini" and p.tensor > 1:
        raise ConfigError(
            f"train.optim=adamw_mini with parallel={p.name} (tensor {p.tensor}): PaddleNLP's "
            "AdamW-mini keeps one second moment per parameter tensor, which tensor "
            "parallelism splits, and PaddleNLP rejects the pair. Use train.optim=adamw, or a "
            "sharding or data-parallel layout."
        )
    if t.offload_optim and env.device == "cpu":
        raise ConfigError(
            "train.offload_optim=true moves optimizer states from device memory to host "
            "memory between steps; on CPU they are in host memory already, so it would do "
            "nothing. Set train.offload_optim=false (or run on a GPU)."
        )


def check_recompute(run: RunConfig) -> dict[str, int]:
    """The recompute details; returns the parsed refined-recompute ops."""
    t, m = run.train, run.model
    layers = m.arch.num_hidden_layers
    detail = []
    if t.recompute_granularity != "full":
        detail.append(f"train.recompute_granularity={t.recompute_granularity}")
    if t.refined_recompute.strip():
        detail.append(f"train.refined_recompute={t.refined_recompute!r}")
    if t.no_recompute_layers is not None:
        detail.append(f"train.no_recompute_layers={t.no_recompute_layers}")
    if detail and not t.recompute:
        raise ConfigError(
            f"{', '.join(detail)} with train.recompute=false: these refine recomputation, "
            "which is off, so they would do nothing. Set train.recompute=true or drop them."
        )
    if t.no_recompute_layers is not None:
        bad = [i for i in t.no_recompute_layers if not 0 <= i < layers]
        if bad or len(set(t.no_recompute_layers)) != len(t.no_recompute_layers):
            raise ConfigError(
                f"train.no_recompute_layers={t.no_recompute_layers}: layer indices must be "
                f"distinct and in 0..{layers - 1} (model {m.name} has {layers} layers)."
            )
    ops = parse_refined_recompute(t.refined_recompute)
    if ops and all(v == 0 for v in ops.values()):
        raise ConfigError(
            f"train.refined_recompute={t.refined_recompute!r}: every skip_num is 0, which "
            "recomputes every op as plain recompute does (PaddleNLP then drops the setting). "
            "Leave train.refined_recompute empty, or keep outputs with -1 or k."
        )
    linear = [op for op, k in ops.items() if op in REFINED_RECOMPUTE_LINEAR_OPS and k != 0]
    if linear and run.parallel.tensor <= 1:
        raise ConfigError(
            f"train.refined_recompute: {', '.join(linear)} refine PaddleNLP's tensor-parallel "
            f"linear layers, and parallel={run.parallel.name} has none (tensor 1); PaddleNLP "
            "would ignore them with a warning. Use a tensor-parallel layout, or drop them."
        )
    if ops.get("flash_attn", 0) != 0 and not m.flash_attention:
        raise ConfigError(
            "train.refined_recompute: flash_attn keeps flash attention's output, and "
            "model.flash_attention=false. Set model.flash_attention=true, or drop flash_attn."
        )
    return ops


def check_trackers(run: RunConfig, available: Any = tracker_available) -> None:
    """``train.report_to``: known trackers, each once, each with its package installed."""
    names = run.train.report_to
    for name in names:
        check_choice("train.report_to", name, tuple(TRACKERS))
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to={names}: a tracker is listed twice.")
    missing = [TRACKERS[n] for n in names if not available(n)]
    if missing:
        raise ConfigError(
            f"train.report_to={names}: "
            + "; ".join(f"{t.name} needs the {t.module} package ({t.install})" for t in missing)
            + ". Install it, or remove it from train.report_to (train.report_to=[] logs to "
            "no tracker; metrics.jsonl is always written)."
        )


def generation_enabled(run: RunConfig) -> bool:
    """``eval.generation``; null follows the data option (``data.generation_metric``) on
    layouts that can generate, and is off on pipeline layouts (recorded as
    ``derived.eval_generation``). An explicit true on a pipeline layout is refused."""
    g = run.eval.generation
    if g is None:  # text data named here; a detected one is turned off by training.run
        text = run.data.format in TEXT_FORMATS
        return run.data.generation_metric and run.parallel.pipeline <= 1 and not text
    return g


def refuse_text_generation(fmt: str) -> ConfigError:
    """eval.generation=true on text documents (named, or detected once the data is read)."""
    return ConfigError(
        f"eval.generation=true with data.format={fmt}: text documents have no prompt/answer "
        "turns to generate from and score. Set eval.generation=false (the eval loss is "
        "still computed)."
    )


def check_generation(run: RunConfig) -> bool:
    """The generation-metric settings; returns whether the metric runs."""
    e = run.eval
    if e.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens={e.max_new_tokens}: must be >= 1.")
    if e.decode_strategy == "greedy" and (e.top_k != 0 or e.top_p != 1.0 or e.temperature != 1.0):
        raise ConfigError(
            f"eval.top_k={e.top_k}, eval.top_p={e.top_p}, eval.temperature={e.temperature} "
            "only apply to eval.decode_strategy=sampling; greedy decoding would ignore them. "
            "Set eval.decode_strategy=sampling, or leave them at 0 / 1.0 / 1.0."
        )
    if e.top_k < 0 or not 0.0 < e.top_p <= 1.0 or e.temperature <= 0.0:
        raise ConfigError(
            f"eval.top_k={e.top_k}, eval.top_p={e.top_p}, eval.temperature={e.temperature}: "
            "need top_k >= 0, 0 < top_p <= 1 and temperature > 0."
        )
    enabled = generation_enabled(run)
    if e.generation and run.data.format in TEXT_FORMATS:
        raise refuse_text_generation(run.data.format)
    p = run.parallel
    if enabled and p.pipeline > 1:
        raise ConfigError(
            f"eval.generation=true with parallel={p.name} (pipeline {p.pipeline}): BLEU/ROUGE "
            "score generated text, and a pipeline model, split across stages, cannot "
            "generate. Set eval.generation=false (the eval loss is still computed), and "
            "score the saved final/ model afterwards with ftlab-predict."
        )
    return enabled


def check_expert_parallel(run: RunConfig, env: Environment, dp: int) -> None:
    """``parallel.expert`` as PaddleNLP 3.0.0b4 implements it, and the layouts that would
    split experts without it.

    Its ``MoELayer`` (Qwen2-MoE, DeepSeek-V2/V3) places the routed experts across the
    data-parallel group whenever fleet's hybrid groups exist (some tensor, pipeline or
    sharding degree > 1); ``use_expert_parallel`` then keeps their gradients rank-local
    and saves each rank's experts. Mixtral's block keeps every expert on every rank.
    """
    p, a = run.parallel, run.model.arch
    moe = family(run.model.family).moe
    hybrid = p.tensor > 1 or p.pipeline > 1 or p.sharding > 1
    name = f"model {run.model.name} ({run.model.family})"
    if p.expert < 1:
        raise ConfigError(f"parallel.expert={p.expert}: must be >= 1 (1: no expert parallelism).")
    if p.expert == 1:
        if a.num_experts and moe is not None and moe.expert_parallel and hybrid and dp > 1:
            raise ConfigError(
                f"parallel={p.name} with {name}: PaddleNLP 3.0.0b4 places the experts across "
                f"the {dp} data-parallel ranks in this layout, which needs expert "
                f"parallelism to train correctly. Set parallel.expert={dp}."
            )
        return
    if not a.num_experts:
        raise ConfigError(
            f"parallel.expert={p.expert}: {name} has no experts (model.arch.num_experts=0). "
            "Set parallel.expert=1."
        )
    if moe is None or not moe.expert_parallel:
        raise ConfigError(
            f"parallel.expert={p.expert}: PaddleNLP 3.0.0b4's {run.model.family} keeps every "
            "expert on every rank (no expert-parallel MoE layer). Set parallel.expert=1 and "
            "shard with parallel.sharding / parallel.tensor instead."
        )
    if a.num_experts % p.expert:
        raise ConfigError(
            f"parallel.expert={p.expert} must divide the {a.num_experts} experts of {name}."
        )
    if p.expert != dp or not hybrid:
        raise ConfigError(
            f"parallel.expert={p.expert}: PaddleNLP 3.0.0b4 splits the experts across the "
            "data-parallel group, and only inside a hybrid layout (tensor, pipeline or "
            f"sharding degree > 1). Here the data-parallel degree is {dp} (tensor "
            f"{p.tensor}, pipeline {p.pipeline}, sharding {p.sharding}): use e.g. "
            f"parallel.tensor=2 with {2 * p.expert} devices, so that data parallel = "
            f"{p.expert}."
        )
    if env.device == "cpu":
        raise ConfigError(
            f"parallel.expert={p.expert} on CPU: experts exchange tokens with all-to-all, "
            "which PaddlePaddle's gloo backend does not implement (ProcessGroupGLOO: "
            "all_to_all unimplemented). Plan it with mode=plan device=gpu, run it on GPUs."
        )


def check_combination(run: RunConfig, dp: int) -> None:
    """Degree combinations PaddleNLP refuses, or would drop without a word."""
    p = run.parallel
    where = f"parallel={p.name}"
    if p.sharding_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.sharding_stage={p.sharding_stage}: one of 0 (off), 1, 2, 3.")
    if p.sharding_stage and p.sharding < 2:
        raise ConfigError(
            f"{where}: parallel.sharding_stage={p.sharding_stage} with parallel.sharding="
            f"{p.sharding} shards over one rank, which PaddleNLP turns off silently. Set "
            "parallel.sharding to 2 or more, or parallel.sharding_stage=0."
        )
    if p.sharding > 1 and not p.sharding_stage:
        raise ConfigError(
            f"{where}: parallel.sharding={p.sharding} without parallel.sharding_stage: "
            "PaddleNLP ignores a sharding degree without a stage. Set sharding_stage=1, 2 "
            "or 3, or use parallel.data for plain data parallelism."
        )
    if p.pipeline > 1 and p.sharding_stage >= 2:
        raise ConfigError(
            f"{where}: pipeline {p.pipeline} with sharding stage {p.sharding_stage}: "
            "PaddleNLP's pipeline parallelism combines with sharding stage 1 only."
        )
    if p.tensor > 1 and p.sharding_stage == 3:
        raise ConfigError(
            f"{where}: tensor {p.tensor} with sharding stage 3: PaddleNLP combines tensor "
            "parallelism with sharding stage 1 or 2 only."
        )
    if p.sequence_parallel and p.tensor < 2:
        raise ConfigError(
            f"{where}: parallel.sequence_parallel=true needs tensor parallelism (it splits "
            "the activations tensor parallelism replicates). Set parallel.tensor >= 2."
        )
    if p.offload and p.sharding_stage not in (2, 3):
        raise ConfigError(
            f"{where}: parallel.offload=true needs sharding stage 2 or 3 (PaddleNLP ignores "
            f"it otherwise); this layout has stage {p.sharding_stage}."
        )
    if p.offload and p.sharding_stage == 2 and dp > 1:
        raise ConfigError(
            f"{where}: parallel.offload=true with sharding stage 2 and data parallel {dp}: "
            "Paddle offloads pure sharding only. Shard over every data rank "
            f"(parallel.sharding={p.sharding * dp}) or turn offload off."
        )
    if p.offload and run.precision.amp_level != "O2":
        raise ConfigError(
            f"{where}: parallel.offload=true needs pure 16-bit training (precision=bf16 or "
            f"fp16_o2): Paddle's sharding offload keeps fp32 master weights on the host; "
            f"precision={run.precision.name} has none."
        )


# launch.* settings read only by parallel=auto and mode=plan (ftlab/planning/cost.py).
COST_SETTINGS = (
    "accelerator",
    "device_memory_gib",
    "device_tflops",
    "mfu",
    "intra_node_gbps",
    "inter_node_gbps",
    "host_gbps",
)


def check_auto_settings(run: RunConfig) -> None:
    """``parallel.auto.*`` and the cost-model settings do nothing without parallel=auto
    (outside plan mode): say so rather than ignore them."""
    if run.parallel.name == "auto":
        return
    if run.parallel.auto != AutoLayoutSettings():
        raise ConfigError(
            f"parallel.auto.* settings apply to parallel=auto only; parallel={run.parallel.name} "
            "names its layout. Drop them, or use parallel=auto."
        )
    defaults = LaunchConfig()
    changed = [k for k in COST_SETTINGS if getattr(run.launch, k) != getattr(defaults, k)]
    if changed and run.mode != "plan":
        raise ConfigError(
            f"launch.{changed[0]} describes the devices for parallel=auto and mode=plan; with "
            f"parallel={run.parallel.name} and mode={run.mode} nothing reads it. Drop it, or "
            "use parallel=auto or mode=plan."
        )


def check_method_layout(run: RunConfig, method: Method) -> None:
    """What the method's PaddleNLP implementation supports of the layout."""
    p = run.parallel
    if p.tensor > 1 and not method.supports_tensor_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={p.name}: this method has no "
            "tensor-parallel implementation. Use a sharding or data-parallel layout instead."
        )
    if p.pipeline > 1 and not method.supports_pipeline_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={p.name} (pipeline {p.pipeline}): this "
            "method has no pipeline-parallel implementation (PaddleNLP's pipeline models "
            "support full fine-tuning and LoRA). Use method=full or method=lora, or a "
            "tensor, sharding or data-parallel layout."
        )


def validate(run: RunConfig, env: Environment) -> Derived:
    """Run every check; return the derived values for the resolved config."""
    check_ranges(run)
    check_choices(run)
    check_precision(run, env)
    check_model(run, env)
    check_data(run)
    if run.method.neftune_noise_alpha < 0:
        raise ConfigError(
            f"method.neftune_noise_alpha={run.method.neftune_noise_alpha}: must be >= 0 "
            "(0 disables)."
        )
    check_auto_settings(run)
    degrees = check_parallel(run, env)
    method = get_method(run.method.name)
    method.check(run, env)
    check_method_layout(run, method)
    check_optimizer(run, env)
    check_recompute(run)
    check_trackers(run)
    check_checkpoint_options(run, degrees.world_size)
    generation = check_generation(run)
    check_long_sequences(run, method)
    stage = get_stage(run.stage.name)
    stage.check(run, env)
    init_from = str(inspect_init(run).path) if run.init_from else None
    t = run.train
    pipeline = run.parallel.pipeline > 1
    return Derived(
        device=env.device,
        world_size=degrees.world_size,
        nproc_per_node=degrees.nproc_per_node,
        data_parallel_degree=degrees.data,
        # Sharding splits the data like data parallelism does, so both multiply the batch.
        global_batch_size=t.per_device_train_batch_size
        * t.gradient_accumulation_steps
        * degrees.data_parallel_world,
        method={**method.derived(run.method), **method.environment_derived(run.method, env)},
        stage=stage.derived(run),
        init_from=init_from,
        # PaddleNLP's PipelineParallel runs gradient_accumulation_steps micro-batches of
        # per_device_train_batch_size through the stages per optimizer step (1F1B).
        pipeline_micro_batch_size=t.per_device_train_batch_size if pipeline else None,
        pipeline_accumulate_steps=t.gradient_accumulation_steps if pipeline else None,
        eval_generation=generation,
        mixture_weights=mixture_weights(run.data),
        context_length=context_length(run.model),
        attention=attention_path(run.model, run.data.packing, env.device).name,
        assumptions=tuple(assumptions(run, env, method)) or None,
        cpu_threads=cpu_threads(run, env),
        **check_best_checkpoint(
            run.train, stage.loss_is_likelihood, run.method.name, method.unified_checkpoint
        ),
    )


def cpu_threads(run: RunConfig, env: Environment) -> int | None:
    """Paddle's math threads per process on a CPU run (``launch.cpu_threads``); None on a
    GPU or a described target, where Paddle's default stands."""
    if env.device != "cpu" or env.described:
        return None
    per_node = processes_per_node(run.parallel)
    return resolve_cpu_threads(run.launch.cpu_threads, per_node, available_cores())


def assumptions(run: RunConfig, env: Environment, method: Method) -> list[str]:
    """What validating against a described machine took for granted (none when probed)."""
    if not env.described:
        return []
    lines = env.assumptions() + method.assumptions(run, env)
    if run.model.flash_attention:
        lines.append(
            "model.flash_attention=true: Paddle's flash-attention kernels assumed to run on "
            "the target GPUs (not checked)"
        )
    return lines


def check_demo_metric(run: RunConfig, dev_records: list[dict]) -> None:
    """Refuse the entity-recall metric on a pipeline model, once the data says it would run.

    The metric runs only when dev records carry ``entities`` (the demo task), which is
    known after the data is read and before the model is loaded (``training.run``).
    """
    p = run.parallel
    if p.pipeline > 1 and run.eval.demo_metric and any("entities" in r for r in dev_records):
        raise ConfigError(
            f"eval.demo_metric=true with parallel={p.name} (pipeline {p.pipeline}): the "
            "entity-recall metric generates text, and a pipeline model, split across "
            "stages, cannot generate. Set eval.demo_metric=false (the eval loss is still "
            "computed), and score the saved final/ model afterwards in one process with "
            "ftlab-predict."
        )


def validate_for(run: RunConfig, env: Environment) -> Derived:
    """``validate``; a plan or export refused on this CPU machine that a GPU machine would
    accept says to add ``device=gpu`` (the checks answered for this machine)."""
    try:
        return validate(run, env)
    except ConfigError as err:
        if run.mode not in ("plan", "export") or env.described or env.device != "cpu":
            raise

        try:
            validate(replace(run, device="gpu"), target_environment(run))
        except ConfigError:
            raise err from None
        raise ConfigError(
            f"{err}\n(mode={run.mode} checked this run against this CPU machine. Add "
            "device=gpu to prepare it for a GPU machine instead; it validates there.)"
        ) from None
