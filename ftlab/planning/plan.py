"""``ftlab mode=plan``: layout, parameter counts and a per-device memory estimate.

Nothing is loaded: the numbers come from ``model.arch`` and the settings, so a plan for
Llama-3-8B on eight GPUs can be made on a laptop before any GPU hours are spent.

The memory model (bytes on the busiest device):

* **weights**: every parameter in the weight dtype (fp32; 16-bit under AMP O2); for QLoRA
  the target linears as packed codes + block scales, LoRA factors in fp32. A preference
  stage (DPO, KTO) whose reference model is a frozen copy (full fine-tuning, PiSSA, VeRA,
  LoKr) adds the base weights once more (``reference``); with LoRA/QLoRA the
  reference is the same model with its adapter switched off and costs no memory.
* **gradients**: trainable parameters in their own dtype.
* **optimizer**: per ``train.optim`` (``ftlab.config.trainer_options.OPTIMIZERS_TABLE``):
  AdamW's two fp32 moments per trainable parameter (``adamw``, ``adamw_custom``; 16-bit
  moments for 16-bit parameters with ``adamw_16bit_moment``), one (``adamw_mini``: its
  second moment is one number per tensor), plus an fp32 master copy of every 16-bit
  trainable parameter (AMP O2, ``multi_precision``). Optimizers updating in Python keep a
  few parameter-sized temporaries during the step (when activations are freed).
  ``train.offload_optim`` keeps the states off the device except during the step.
* **activations**: tensors autograd keeps for backward, per micro-batch of
  ``per_device_train_batch_size`` x ``data.max_length`` tokens (the longest a batch can be).
  Per token and layer: ``12h + 2*kv_dim + 3*intermediate`` elements, plus
  ``heads * seq_len`` for the softmax output where the scores exist: eager attention, and
  flash attention on CPU (Paddle's CPU "flash" attention is its math kernel; measured: it
  saves exactly what eager attention saves); outside the layers ``3.3h + vocab`` (final
  norm, the softmax kept for the loss). These coefficients were fitted to Paddle's CPU
  allocator counts for PaddleNLP's eager Llama (fp32) and reproduce them within 2%
  (``bench/plan_vs_measured.py --fit``). With recompute a layer keeps, per
  token (fitted the same way): ``h`` (granularity ``full``), ``6h + 3*intermediate``
  (``full_attn``), everything but the attention scores (``core_attn``), plus one block
  being recomputed in backward. PaddleNLP does not recompute the first layer when its
  input needs no gradient (frozen embeddings: LoRA, QLoRA) under ``full`` and
  ``full_attn``, so that layer keeps all of its activations, as do
  ``train.no_recompute_layers``; ``train.refined_recompute`` adds the outputs it keeps in
  the layers it skips. A transient of the largest temporary (attention scores or logits
  gradient) is added.
* **attention masks**: the collated mask per row (FlashMask indices ``4L`` bytes, a dense
  packed mask ``L^2``, a padding mask ``8L``) plus the ``[1, 1, L, L]`` mask the model
  builds from a dense or padding mask in the compute dtype; with flash attention and
  FlashMask on GPU there is no ``L^2`` term at all (on CPU it stays as an upper bound:
  each example is attended alone under its own ``[n, n]`` causal mask,
  ``ftlab.models.attention``). The plan prints the
  attention path the run takes.

Parameters come from ``ftlab.models.arch`` (the family's layers expanded over the model,
exact against the live PaddleNLP model for every family). Mixture-of-experts layers count
every routed expert (``total``) and the top-k a token runs through (``active``); their
activations use the MLP width a token runs through (top-k experts + shared expert), an
extrapolation of the dense fit, not a measurement.

Splits: tensor parallel divides linear and vocab weights by ``tensor`` (norms, biases,
routers and the linears PaddleNLP keeps whole, such as DeepSeek's low-rank projections, are
replicated; routed experts only where the family's experts are tensor-parallel); expert
parallel divides the routed experts by ``parallel.expert``; tensor parallel also splits
the activations except a replicated ``6h`` per token and layer (also split with sequence
parallel); pipeline parallel keeps ``ceil(layers / pipeline)`` layers, plus
the embedding on the first stage and the LM head on the last, and holds up to
``min(pipeline, gradient_accumulation_steps)`` micro-batches in flight (1F1B); sharding
stage 1 divides optimizer states, stage 2 also gradients, stage 3 also weights; sharding
offload (stage 2/3) leaves the optimizer states on the host, and under stage 3 the device
holds only the layers being computed.

On CPU the measured number is the process's peak RSS, which also holds the Python and
Paddle/PaddleNLP runtime (libraries, allocator pools, tokenizer, data): a constant
``CPU_RUNTIME_BASELINE_MIB``, measured once (see the bench), is added to the CPU estimate
and reported as its own line. glibc's default malloc keeps freed heap memory (its mmap
threshold grows with the largest freed block), so measured RSS runs above live tensors by
up to a few hundred MiB on activation-heavy runs; with ``MALLOC_MMAP_THRESHOLD_=65536`` it
tracks them (``bench/plan_vs_measured.py`` shows both). GPU figures are device memory
(allocated tensors; the CUDA context is not included) and are a model, not a
measurement: only the CPU (fp32) path was checked against measurements.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ftlab.config.derived import Derived
from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.config.trainer_options import OPTIMIZERS_TABLE, parse_refined_recompute
from ftlab.methods.catalog import get_method
from ftlab.methods.registry import AdapterPlan
from ftlab.models.arch import base_counts, ffn_width, kv_dim
from ftlab.models.attention import AttentionPath, attention_path
from ftlab.models.families import family
from ftlab.record.rundir import PLAN, RunDir
from ftlab.stages.catalog import get_stage
from ftlab.stages.registry import REFERENCE_COPY, StagePlan

MIB = 2**20
# Peak RSS of an ftlab training process whose tensors are negligible (one tiny training
# step of a 1-layer, hidden-8 model through the same Trainer, data and tokenizer code):
# Python + Paddle + PaddleNLP + VisualDL. Measured with paddlepaddle 3.3.1 (CPU),
# paddlenlp 3.0.0b4, Python 3.11, Linux x86-64 by `bench/plan_vs_measured.py --baseline`.
CPU_RUNTIME_BASELINE_MIB = 556.0

# Activation elements saved for backward, per token (fitted; see the module docstring).
ACT_PER_LAYER_H = 12.0
ACT_PER_LAYER_KV = 2.0
ACT_PER_LAYER_FFN = 3.0
ACT_PER_LAYER_SCORES = 1.0  # x heads x seq_len, where the scores exist (not GPU flash)
ACT_OUTSIDE_H = 3.3
ACT_OUTSIDE_VOCAB = 1.0  # the softmax kept for the loss gradient
ACT_TP_REPLICATED_H = 6.0  # of ACT_PER_LAYER_H, not split by tensor parallelism
# What a recomputed layer keeps per token, by ``train.recompute_granularity`` (elements of
# h, kv_dim, intermediate, heads*seq), fitted like the terms above (``--fit``: 1.00 h for
# full; 6.00 h + 3.00 ffn for full_attn, which recomputes the attention block; for
# core_attn, which recomputes only q.k^T, softmax and the product with v, every term but
# the scores).
ACT_KEPT = {
    "full": (1.0, 0.0, 0.0, 0.0),
    "full_attn": (6.0, 0.0, ACT_PER_LAYER_FFN, 0.0),
    "core_attn": (ACT_PER_LAYER_H, ACT_PER_LAYER_KV, ACT_PER_LAYER_FFN, 0.0),
}
# Refined recompute keeps an op's output in the layers it skips (per token): flash
# attention's output and log-sum-exp; the tensor-parallel linears' outputs (modelled from
# the tensor shapes, GPU-only, not measured here).
REFINED_KEPT = {
    "flash_attn": (1.0, 0.0, 0.0, 0.0),  # + heads (log-sum-exp), added below
    "attention_column_ln": (1.0, 2.0, 0.0, 0.0),  # q, k, v projections (split)
    "attention_row_ln": (1.0, 0.0, 0.0, 0.0),  # o_proj output
    "mlp_column_ln": (0.0, 0.0, 2.0, 0.0),  # gate and up projections (split)
    "mlp_row_ln": (1.0, 0.0, 0.0, 0.0),  # down projection output
}
# An optimizer whose update is Python tensor code (PaddleNLP's AdamWMini, AdamWCustom,
# AdamW_16Bit) holds this many temporaries the size of the parameter it updates.
OPTIMIZER_PY_TEMPORARIES = 4


@dataclass
class ParamCounts:
    total: int  # every parameter of the base model (+ what the method adds)
    trainable: int
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    per_layer: int  # one decoder layer, norms and biases included
    norms_and_biases_per_layer: int
    final_norm: int
    adapter: int  # trainable parameters the method adds (0 for full fine-tuning)
    adapter_per_layer: int
    quantized: int  # base parameters stored quantized (QLoRA target linears)
    quantized_per_layer: int
    quantized_lm_head: int
    frozen_added: int = 0  # frozen parameters the method adds (VeRA's projections)
    frozen_added_per_layer: int = 0
    # Mixture of experts: base-model parameters one token runs through (top-k of the routed
    # experts) and the routed experts' share of the base (dense: the base total, and 0).
    active: int = 0
    experts: int = 0
    targets: list[str] = field(default_factory=list)  # short names of the adapted linears


def count_parameters(run: RunConfig, adapter: AdapterPlan | None = None) -> ParamCounts:
    """Parameter counts of the model as ``model.arch`` describes it, for the chosen method."""
    base = base_counts(run.model)
    a = adapter if adapter is not None else get_method(run.method.name).plan(run)
    return ParamCounts(
        total=base.total + a.adapter + a.frozen,
        trainable=base.total if a.trains_base else a.adapter,
        embedding=base.embedding,
        lm_head=base.lm_head,
        per_layer=base.per_layer,
        norms_and_biases_per_layer=base.norms_and_biases_per_layer,
        final_norm=base.final_norm,
        adapter=a.adapter,
        adapter_per_layer=a.adapter_per_layer,
        quantized=a.quantized,
        quantized_per_layer=a.quantized_per_layer,
        quantized_lm_head=a.quantized_lm_head,
        frozen_added=a.frozen,
        frozen_added_per_layer=a.frozen_per_layer,
        active=base.active,
        experts=base.experts,
        targets=list(a.targets),
    )


@dataclass
class Layout:
    world_size: int
    nproc_per_node: int
    nnodes: int
    data: int
    tensor: int
    pipeline: int
    sharding: int
    sharding_stage: int
    sequence_parallel: bool
    expert: int
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    seq_len: int
    layers_per_stage: int
    micro_batches_in_flight: int


def layout(run: RunConfig, derived: Derived) -> Layout:
    p, t = run.parallel, run.train
    layers = math.ceil(run.model.arch.num_hidden_layers / p.pipeline)
    return Layout(
        world_size=derived.world_size,
        nproc_per_node=derived.nproc_per_node,
        nnodes=run.launch.nnodes,
        data=derived.data_parallel_degree,
        tensor=p.tensor,
        pipeline=p.pipeline,
        sharding=p.sharding,
        sharding_stage=p.sharding_stage,
        sequence_parallel=p.sequence_parallel,
        expert=p.expert,
        micro_batch=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        global_batch=derived.global_batch_size,
        seq_len=run.data.max_length,
        layers_per_stage=layers,
        micro_batches_in_flight=min(p.pipeline, t.gradient_accumulation_steps)
        if p.pipeline > 1
        else 1,
    )


@dataclass
class Memory:
    """Bytes on the busiest device (see the module docstring for the model)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_recompute: float  # with train.recompute_granularity (and refinements)
    attention_masks: float  # the collated mask + the model's [B, 1, L, L] mask, per batch
    total: float
    total_recompute: float
    in_use: float  # total with train.recompute as configured
    runtime_baseline: float  # CPU only: the process baseline added to estimate RSS
    estimated_rss: float | None  # CPU only: in_use + runtime_baseline
    # A preference stage's frozen reference copy of the starting model (0: none held).
    reference: float = 0.0


def _weight_bytes(run: RunConfig, adapter_plan: AdapterPlan) -> tuple[int, int]:
    """(bytes per base weight, bytes per trainable adapter weight)."""
    half = run.precision.amp_level == "O2" and run.precision.dtype != "float32"
    base = 2 if half else 4
    return base, (4 if adapter_plan.adapter_fp32 else base)


def _stage_params(
    run: RunConfig, counts: ParamCounts, plan: AdapterPlan, lay: Layout, which: str
) -> tuple[float, float, float]:
    """(float, quantized, adapter) parameters on one device of a pipeline stage.

    ``only``: no pipeline. ``first``: its layers + the embedding. ``last``: its layers +
    the LM head (a copy of the embedding when tied) + the final norm. Tensor parallelism
    splits linears and the vocabulary dimension; norms, biases and routers are replicated.
    Routed experts are split across the expert-parallel ranks (and by tensor parallelism
    where the family's PaddleNLP experts are tensor-parallel). What a method adds inside
    the layers follows its stage's share of the layers' parameters.
    """
    tp, ep = lay.tensor, lay.expert
    base = base_counts(run.model)
    moe = family(run.model.family).moe
    expert_tp = tp if moe is not None and moe.tensor_parallel_experts else 1
    layers = base.layers[: lay.layers_per_stage] if which == "first" else base.layers
    if which == "last":
        layers = base.layers[-lay.layers_per_stage :]
    all_layers = sum(x.total for x in base.layers)
    share = sum(x.total for x in layers) / all_layers if all_layers else 0.0
    experts = sum(x.experts for x in layers)
    expert_share = experts / sum(x.total for x in layers) if layers else 0.0
    on_device = (1 - expert_share) / tp + expert_share / (ep * expert_tp)
    n = run.model.arch.num_hidden_layers
    quant_layers = plan.quantized_layers or plan.quantized_per_layer * n
    adapter_layers = plan.adapter_layers or plan.adapter_per_layer * n
    frozen_layers = plan.frozen_layers or plan.frozen_per_layer * n
    floats = sum(x.split / tp + x.experts / (ep * expert_tp) + x.replicated for x in layers)
    floats += (frozen_layers - quant_layers) * share * on_device
    quant = quant_layers * share * on_device
    adapter = adapter_layers * share * on_device
    head_adapter = (counts.adapter - adapter_layers) / tp
    head = counts.lm_head or counts.embedding
    if which in ("only", "first"):
        floats += counts.embedding / tp
    if which == "only":
        floats += (counts.lm_head - counts.quantized_lm_head) / tp + counts.final_norm
    if which == "last":
        floats += (head - counts.quantized_lm_head) / tp + counts.final_norm
    if which in ("only", "last"):
        quant += counts.quantized_lm_head / tp
        adapter += head_adapter
        floats += (counts.frozen_added - frozen_layers) / tp
    return floats, quant, adapter


def expert_params_per_device(run: RunConfig, lay: Layout) -> float:
    """Routed-expert parameters one device holds (the busiest pipeline stage's share)."""
    base = base_counts(run.model)
    moe = family(run.model.family).moe
    if not base.experts or moe is None:
        return 0.0
    expert_tp = lay.tensor if moe.tensor_parallel_experts else 1
    k = lay.layers_per_stage
    stages = [base.layers[:k], base.layers[-k:]] if lay.pipeline > 1 else [base.layers]
    return max(sum(x.experts for x in stage) for stage in stages) / (lay.expert * expert_tp)


def estimate_memory(
    run: RunConfig,
    counts: ParamCounts,
    lay: Layout,
    device: str,
    adapter_plan: AdapterPlan | None = None,
    stage_plan: StagePlan | None = None,
) -> Memory:
    a, p = run.model.arch, run.parallel
    h, v, heads = a.hidden_size, a.vocab_size, a.num_attention_heads
    kv = kv_dim(run.model)
    tp, stage = lay.tensor, lay.sharding_stage
    plan = adapter_plan if adapter_plan is not None else get_method(run.method.name).plan(run)
    base_b, adapter_b = _weight_bytes(run, plan)
    full = plan.trains_base
    layers = lay.layers_per_stage

    qbytes = plan.quantized_bytes_per_param if counts.quantized else 0.0
    stages = [
        _stage_params(run, counts, plan, lay, which)
        for which in (("only",) if lay.pipeline == 1 else ("first", "last"))
    ]
    # The busiest stage: the one whose parameters take the most bytes.
    stage_float, stage_quant, adapter = max(
        stages, key=lambda x: x[0] * base_b + x[1] * qbytes + x[2] * adapter_b
    )
    weights = stage_float * base_b + stage_quant * qbytes + adapter * adapter_b
    stage_plan = stage_plan if stage_plan is not None else get_stage(run.stage.name).plan(run)
    # A frozen copy of the starting model: the base weights of this device, no gradients
    # or optimizer states; its forward keeps no activations (no_grad).
    reference = (
        stage_float * base_b + stage_quant * qbytes
        if stage_plan.reference == REFERENCE_COPY
        else 0.0
    )
    trainable = stage_float if full else adapter
    train_b = base_b if full else adapter_b
    gradients = trainable * train_b
    opt = OPTIMIZERS_TABLE[run.train.optim]
    master = 4 if train_b == 2 else 0
    moment_b = train_b if opt.moments_follow_param_dtype and train_b == 2 else 4
    optimizer = trainable * (opt.moments_per_param * moment_b + master)
    # Python updates allocate temporaries the size of the parameter being updated; the
    # largest trainable tensor bounds them (the embedding or head in full fine-tuning).
    largest = max(counts.lm_head or counts.embedding, 1) / tp if full else 0.0
    if not full:
        largest = counts.adapter_per_layer / max(len(counts.targets), 1) / tp
    opt_transient = OPTIMIZER_PY_TEMPORARIES * largest * 4 if opt.python_update else 0.0
    if stage >= 1:
        optimizer /= lay.sharding
    if stage >= 2:
        gradients /= lay.sharding
    if stage >= 3:
        weights /= lay.sharding
    if p.offload and stage >= 2:
        # Paddle's group-sharded offload keeps the fp32 master weights and AdamW moments on
        # the host; stage 3 also its weight and gradient shards, gathering a layer (and
        # prefetching the next) onto the device as it runs.
        optimizer = 0.0
        if stage >= 3:
            largest = max(2 * counts.per_layer, counts.lm_head or counts.embedding) / tp
            weights = min(weights, largest * base_b)
            gradients = min(gradients, largest * train_b) if full else gradients

    # Activations per micro-batch.
    act_b = 4 if run.precision.dtype == "float32" or device == "cpu" else 2
    tokens = lay.micro_batch * lay.seq_len
    path = attention_path(run.model, run.data.packing, device)
    scores = ACT_PER_LAYER_SCORES * heads * lay.seq_len if path.scores_kept else 0.0

    def per_token_layer(c_h: float, c_kv: float, c_ffn: float, c_scores: float) -> float:
        """Elements per micro-batch of one layer's terms, split as tensor parallelism does."""
        replicated = min(ACT_TP_REPLICATED_H, c_h) * h
        split = c_h * h - replicated + c_kv * kv + c_ffn * ffn_width(run.model) + c_scores * scores
        return (replicated / (tp if p.sequence_parallel else 1) + split / tp) * tokens

    per_layer = per_token_layer(
        ACT_PER_LAYER_H, ACT_PER_LAYER_KV, ACT_PER_LAYER_FFN, ACT_PER_LAYER_SCORES
    )
    granularity = run.train.recompute_granularity
    kept = per_token_layer(*ACT_KEPT[granularity])
    vocab = v / tp if v % tp == 0 else v
    outside = (ACT_OUTSIDE_H * h + ACT_OUTSIDE_VOCAB * vocab) * tokens
    transient = max(scores / tp, vocab) * tokens
    flight = lay.micro_batches_in_flight
    act = (layers * per_layer * flight + outside + transient) * act_b
    # Layers that keep everything under recompute: train.no_recompute_layers (those on the
    # first stage, the busiest), and layer 0 when its input needs no gradient (frozen
    # embeddings: LoRA, QLoRA) for full and full_attn, which test the layer's input;
    # core_attn tests q/k/v, which an adapter or full fine-tuning makes trainable.
    stage_layers = range(layers)
    whole = {i for i in run.train.no_recompute_layers or [] if i in stage_layers}
    if not full and lay.pipeline == 1 and granularity in ("full", "full_attn"):
        whole.add(0)
    refined = 0.0
    for op, skip in parse_refined_recompute(run.train.refined_recompute).items():
        n = layers if skip < 0 else min(skip, layers)
        extra = heads * tokens / tp if op == "flash_attn" else 0.0
        refined += n * (per_token_layer(*REFINED_KEPT[op]) + extra)
    # Backward recomputes one block at a time: a whole layer (full), the attention block
    # (full_attn) or the attention core (core_attn) is live again on top of what is kept.
    recomputed = per_layer if granularity == "full" else per_layer - kept
    act_rc = (
        ((layers - len(whole)) * kept + len(whole) * per_layer + refined) * flight
        + recomputed
        + outside
        + transient
    ) * act_b

    masks = attention_mask_bytes(path, lay, act_b)
    if run.train.offload_optim:
        # States live in host memory and come back for the step, when the activations of
        # the micro-batch are already freed: the peak is the larger of the two phases.
        total = masks + weights + reference + gradients + max(act, optimizer + opt_transient)
        total_rc = masks + weights + reference + gradients + max(act_rc, optimizer + opt_transient)
    else:
        total = masks + weights + reference + gradients + optimizer + max(act, opt_transient)
        total_rc = masks + weights + reference + gradients + optimizer + max(act_rc, opt_transient)
    in_use = total_rc if run.train.recompute else total
    baseline = CPU_RUNTIME_BASELINE_MIB * MIB if device == "cpu" else 0.0
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=act,
        activations_recompute=act_rc,
        attention_masks=masks,
        total=total,
        total_recompute=total_rc,
        in_use=in_use,
        runtime_baseline=baseline,
        estimated_rss=in_use + baseline if device == "cpu" else None,
        reference=reference,
    )


def attention_mask_bytes(path: AttentionPath, lay: Layout, act_bytes: int) -> float:
    """Masks held per micro-batch in flight: the collated one (what the loader hands over)
    and the ``[B, 1, L, L]`` one the model builds from it (none with FlashMask on GPU)."""
    row = path.collated_mask_bytes(lay.seq_len) + path.model_mask_bytes(lay.seq_len, act_bytes)
    return float(row * lay.micro_batch * lay.micro_batches_in_flight)


def make_plan(run: RunConfig, derived: Derived, device: str) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what ``plan.json`` holds)."""
    adapter = get_method(run.method.name).plan(run)
    stage = get_stage(run.stage.name).plan(run)
    counts = count_parameters(run, adapter)
    lay = layout(run, derived)
    mem = estimate_memory(run, counts, lay, device, adapter, stage)
    path = attention_path(run.model, run.data.packing, device)
    a = run.model.arch
    moe = None
    if counts.experts:
        per_device = expert_params_per_device(run, lay)
        base_b, _ = _weight_bytes(run, adapter)
        moe = {
            "num_experts": a.num_experts,
            "experts_per_token": a.num_experts_per_tok,
            "expert_parallel": lay.expert,
            "experts_per_device_per_layer": a.num_experts // lay.expert,
            "expert_params": counts.experts,
            "expert_params_per_device": per_device,
            # Base weights of the experts on the busiest device (in the weights line).
            "expert_weight_bytes_per_device": per_device * base_b,
        }
    return {
        "model": run.model.name,
        "device": device,
        "attention": {"path": path.name, "description": path.describe()},
        "context_length": derived.context_length,
        "precision": {"dtype": run.precision.dtype, "amp_level": run.precision.amp_level},
        "method": {"name": run.method.name, **adapter.details},
        "method_lines": adapter.lines + stage.lines,
        "stage": {"name": run.stage.name, **stage.details},
        "layout": asdict(lay),
        "parameters": {k: v for k, v in asdict(counts).items() if k != "targets"},
        "memory_bytes": asdict(mem),
        "memory_mib": {k: None if v is None else round(v / MIB, 1) for k, v in asdict(mem).items()},
        "recompute": run.train.recompute,
        "recompute_granularity": run.train.recompute_granularity,
        "refined_recompute": run.train.refined_recompute,
        "no_recompute_layers": run.train.no_recompute_layers,
        "optimizer": {
            "name": run.train.optim,
            "label": OPTIMIZERS_TABLE[run.train.optim].label,
            "offload": run.train.offload_optim,
        },
        "moe": moe,
        "assumptions": list(derived.assumptions or ()),
    }


def format_plan(plan: dict[str, Any]) -> str:
    lay, par, mem = plan["layout"], plan["parameters"], plan["memory_mib"]
    method = plan["method"]

    def mib(x: float | None) -> str:
        return "n/a" if x is None else (f"{x / 1024:,.2f} GiB" if x >= 1024 else f"{x:,.1f} MiB")

    lines = [
        f"model          {plan['model']}  method {method['name']}  precision "
        f"{plan['precision']['dtype']}/{plan['precision']['amp_level']}  device {plan['device']}",
        f"layout         world {lay['world_size']} = {lay['nnodes']} node(s) x "
        f"{lay['nproc_per_node']} proc; data {lay['data']}, tensor {lay['tensor']}, pipeline "
        f"{lay['pipeline']}, sharding {lay['sharding']} (stage {lay['sharding_stage']})"
        + (", sequence parallel" if lay["sequence_parallel"] else "")
        + (f", expert {lay['expert']}" if lay["expert"] > 1 else ""),
        f"batch          micro {lay['micro_batch']} x seq {lay['seq_len']}, grad accumulation "
        f"{lay['gradient_accumulation_steps']}, global {lay['global_batch']}",
        f"parameters     total {par['total']:,}, trainable {par['trainable']:,} "
        f"({100 * par['trainable'] / par['total']:.2f}%)",
        f"attention      {plan['attention']['description']}",
    ]
    if plan.get("context_length") is not None:
        lines.append(f"context        {plan['context_length']:,} positions")
    moe = plan.get("moe")
    if moe:
        lines += [
            f"experts        {moe['num_experts']} per MoE layer, top-{moe['experts_per_token']}: "
            f"a token runs through {par['active']:,} of the base model's "
            f"{par['total'] - par['adapter'] - par['frozen_added']:,} parameters; "
            f"routed experts {par['experts']:,}",
            f"               expert parallel {moe['expert_parallel']}: "
            f"{moe['experts_per_device_per_layer']} experts per layer per device, "
            f"{moe['expert_params_per_device']:,.0f} expert parameters "
            f"({mib(moe['expert_weight_bytes_per_device'] / MIB)}) on the busiest device",
        ]
    lines += plan["method_lines"]
    rc = "  <- train.recompute" if plan["recompute"] else ""
    no_rc = "" if plan["recompute"] else "  <- train.recompute=false"
    lines += [
        "memory / device (busiest device)",
        f"  weights              {mib(mem['weights'])}",
        *([f"  reference (frozen)   {mib(mem['reference'])}"] if mem.get("reference") else []),
        f"  gradients            {mib(mem['gradients'])}",
        f"  {'optimizer (' + optimizer_label(plan) + ')':<20} {mib(mem['optimizer'])}",
        f"  activations          {mib(mem['activations'])} without recompute, "
        f"{mib(mem['activations_recompute'])} with ({plan['recompute_granularity']})",
        f"  attention masks      {mib(mem['attention_masks'])}",
        f"  total                {mib(mem['total'])} without recompute{no_rc}",
        f"                       {mib(mem['total_recompute'])} with recompute{rc}",
    ]
    if plan.get("assumptions"):
        lines.append("assumed (validated for a described machine, not this one)")
        lines += [f"  - {a}" for a in plan["assumptions"]]
    if mem["estimated_rss"] is not None:
        lines.append(
            f"  CPU peak RSS         {mib(mem['estimated_rss'])} = total + "
            f"{mib(mem['runtime_baseline'])} Python/Paddle runtime baseline (measured once)"
        )
    return "\n".join(lines)


def optimizer_label(plan: dict[str, Any]) -> str:
    opt = plan["optimizer"]
    return opt["label"] + (", offloaded between steps" if opt["offload"] else "")


def print_plan(
    run: RunConfig,
    derived: Derived,
    env: Environment,
    run_dir: RunDir,
    extra: dict[str, Any] | None = None,
    extra_lines: list[str] | None = None,
) -> dict[str, Any]:
    """Print the plan and write ``plan.json`` into the run dir; loads no weights.

    ``extra`` (keys added to ``plan.json``) and ``extra_lines`` (printed after the plan)
    carry what other planners add: the step-time estimate and parallel=auto's ranking.
    """
    from ftlab.planning.disk import disk_lines, disk_warning, plan_disk

    plan = make_plan(run, derived, env.device)
    plan.update(extra or {})
    disk = plan_disk(run, derived.world_size, env.described, run_dir.path)
    plan["disk"] = disk.to_dict()
    plan["run_dir"] = str(run_dir)
    run_dir.write_text(PLAN, json.dumps(plan, indent=2) + "\n")
    warning = disk_warning(disk)
    lines = format_plan(plan).splitlines() + disk_lines(disk) + list(extra_lines or [])
    lines += [f"warning: {warning}"] if warning else []
    print("\nftlab plan\n" + "\n".join("  " + x for x in lines), flush=True)
    return plan
