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
tracks them (``bench/plan_vs_measured.py`` shows both).

On GPU (``docs/plan-calibration.md``; constants in ``GPU_RUNTIME`` and ``LOGITS_COPIES``):

* **logits and loss**: PaddleNLP computes the loss in fp32 over ``micro-batch x seq x
  vocab`` (the 16-bit logits, their fp32 cast and the fp32 softmax live together), a line
  of its own instead of the CPU fit's vocabulary terms.
* **evaluation pass**: what training keeps resident plus a no-grad forward of
  ``per_device_eval_batch_size`` rows (one layer's working set, or the logits and loss,
  the larger); with a large vocabulary it can exceed the training step.
* **allocator reserve**: Paddle's auto-growth allocator keeps freed blocks; reserved memory
  is the larger of training and evaluation times ``1 + GPU_RUNTIME.allocator_reserve``.
* **CUDA/NCCL runtime**: the CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers per
  communicator of each process.

``needed`` is what the busiest device must have (GPU: what nvidia-smi would show; CPU:
the estimated peak RSS); ``parallel=auto`` fits on it. Held against published GPU figures
(``tests/fixtures/published_memory``): 16 of 19 rows within 20%, the other three at
0.64 (DPO's loss), 0.72 and 0.77 (``docs/plan-calibration.md`` says why).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ftlab.config.derived import Derived
from ftlab.config.environment import Environment
from ftlab.config.schema import AutoLayoutSettings, RunConfig
from ftlab.config.trainer_options import OPTIMIZERS_TABLE, parse_refined_recompute
from ftlab.distributed.degrees import Degrees
from ftlab.distributed.layout import parallel_degrees, processes_per_node
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method
from ftlab.methods.registry import AdapterPlan
from ftlab.models import cpu_layers
from ftlab.models.arch import base_counts, ffn_width, kv_dim
from ftlab.models.attention import AttentionPath, attention_path
from ftlab.models.families import family
from ftlab.planning.candidates import (
    MEMORY,
    Candidate,
    RecomputeChoice,
    candidate_run,
    recompute_choice_of,
)
from ftlab.planning.cost import Hardware, Shape, resolve_hardware, step_time
from ftlab.planning.counts import ParamCounts
from ftlab.planning.disk import disk_lines, disk_warning, plan_disk
from ftlab.planning.report import Decision, assumed_sources, format_decision, gib
from ftlab.record.rundir import PLAN, RunDir
from ftlab.stages.catalog import get_stage
from ftlab.stages.registry import REFERENCE_COPY, StagePlan

MIB = 2**20
GIB = 2**30
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
# The CPU fast path's extra per layer (ftlab.models.cpu_layers.EXTRA_PER_LAYER: each norm
# 1 h, the rotary embedding 2 h + 2 kv) that a recomputed layer still keeps: none under
# full recompute, the two norms' under full_attn (both run outside PaddleNLP's recomputed
# self-attention), all of it under core_attn (measured: tests/test_plan.py).
FAST_LAYERS_KEPT = {"full": (0.0, 0.0), "full_attn": (2.0, 0.0), "core_attn": (4.0, 2.0)}
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

# --------------------------------------------------------------------------- GPU terms
# What a GPU process holds beyond the tensors the CPU fit counts. Every constant is named
# here, once, with where it comes from; docs/plan-calibration.md holds the published
# measurements they were checked against (tests/fixtures/published_memory/).
#
# The logits and the loss (16-bit copies, fp32 copies) per element of micro-batch x seq x
# vocab. PaddleNLP's causal-LM criterion casts the logits to float32 before
# ``cross_entropy`` (``prediction_scores.astype("float32")`` in the Llama/Qwen2
# pretraining criterion) and Paddle's ``cross_entropy_with_softmax`` keeps the fp32
# softmax for backward, while the model output still holds the 16-bit logits: 1 x 16-bit +
# 2 x fp32 at the loss's forward (10 B per element in bf16/fp16). Backward holds the
# 16-bit logits, the fp32 gradient and its 16-bit cast: 8 B if the gradient replaces the
# softmax in place (legacy softmax_with_cross_entropy declares it; not verified for the phi
# kernel here), 12 B if not. 10 B matches PaddleNLP's published rows (docs/plan-calibration.md).
# The evaluation pass computes the same loss without backward.
LOGITS_COPIES = (1.0, 2.0)
LOGITS_EVAL_COPIES = (1.0, 2.0)


@dataclass(frozen=True)
class GpuRuntime:
    """Per-process device memory outside the tensors, and the allocator's reserve."""

    # CUDA context with Paddle's GPU kernels resident: an assumption (typically 0.3-1.0 GiB
    # per process depending on the CUDA version and lazy loading; not measured here), kept
    # at the value the published table is matched with.
    cuda_context_mib: float
    # cuBLAS/cuBLASLt handle workspaces (4-32 MiB each per stream) and cuDNN's; an LLM has
    # no convolutions, so cuDNN's large conv workspace (FLAGS_conv_workspace_size_limit)
    # is not allocated.
    workspaces_mib: float
    # NCCL per communicator: NCCL_BUFFSIZE (4 MiB, NCCL's documented default) x send/recv x
    # the channels of an NVLink node (16 assumed).
    nccl_per_communicator_mib: float
    # Paddle's auto-growth allocator (FLAGS_allocator_strategy=auto_growth, the default)
    # keeps freed blocks cached: reserved memory runs above the allocated peak by this
    # share of it. PaddleNLP's pretraining table (llm/docs/pretrain.rst) says physical use
    # is "about 2-3 GB more" than max_memory_allocated at 50-64 GB: with the runtime
    # below taken out, 3-4%.
    allocator_reserve: float


GPU_RUNTIME = GpuRuntime(
    cuda_context_mib=700.0,
    workspaces_mib=64.0,
    nccl_per_communicator_mib=2 * 4 * 16,
    allocator_reserve=0.04,
)


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


@dataclass(frozen=True, kw_only=True)
class Layout(Degrees):
    """The run's degrees and what one device holds of a step: the batch split, the layers
    of a pipeline stage and the micro-batches in flight."""

    micro_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    seq_len: int
    layers_per_stage: int
    micro_batches_in_flight: int

    def to_dict(self) -> dict[str, Any]:
        """``plan.json``'s ``layout``: the world size first, then every field."""
        return {"world_size": self.world_size, **asdict(self)}


def layout(run: RunConfig, derived: Derived) -> Layout:
    p, t = run.parallel, run.train
    layers = math.ceil(run.model.arch.num_hidden_layers / p.pipeline)
    degrees = parallel_degrees(p, run.launch.nnodes, derived.nproc_per_node)
    return Layout(
        **degrees.as_kwargs(),
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
    # GPU terms (ftlab.planning.plan GPU_RUNTIME, LOGITS_COPIES; docs/plan-calibration.md).
    logits: float = 0.0  # GPU: the logits and the loss of a micro-batch (CPU: in activations)
    evaluation: float = 0.0  # the evaluation pass's peak (per_device_eval_batch_size)
    allocator_reserve: float = 0.0  # GPU: freed blocks the auto-growth allocator keeps
    gpu_runtime: float = 0.0  # GPU: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers
    # What the busiest device must have: CPU the estimated peak RSS; GPU the reserved
    # memory nvidia-smi shows, max(training, evaluation) + reserve + runtime.
    needed: float = 0.0
    training_reserved: float | None = None  # GPU: the training steps alone, as reserved


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


@dataclass
class ParameterStates:
    """Parameter-sized bytes on the busiest device (weights and what training keeps per
    parameter), after the sharding stage and offload have taken their share."""

    weights: float
    reference: float  # a preference stage's frozen copy of the starting model
    gradients: float
    optimizer: float
    optimizer_transient: float  # a Python optimizer's temporaries during the step


def parameter_states(
    run: RunConfig, counts: ParamCounts, lay: Layout, plan: AdapterPlan, stage_plan: StagePlan
) -> ParameterStates:
    """Weights, the frozen reference copy, gradients and optimizer states of the busiest
    pipeline stage (the one whose parameters take the most bytes)."""
    base_b, adapter_b = _weight_bytes(run, plan)
    full, tp, stage = plan.trains_base, lay.tensor, lay.sharding_stage
    qbytes = plan.quantized_bytes_per_param if counts.quantized else 0.0
    stages = [
        _stage_params(run, counts, plan, lay, which)
        for which in (("only",) if lay.pipeline == 1 else ("first", "last"))
    ]
    floats, quant, adapter = max(
        stages, key=lambda x: x[0] * base_b + x[1] * qbytes + x[2] * adapter_b
    )
    weights = floats * base_b + quant * qbytes + adapter * adapter_b
    # A frozen copy of the starting model: the base weights of this device, no gradients
    # or optimizer states; its forward keeps no activations (no_grad).
    reference = floats * base_b + quant * qbytes if stage_plan.reference == REFERENCE_COPY else 0.0
    trainable = floats if full else adapter
    train_b = base_b if full else adapter_b
    gradients = trainable * train_b
    opt = OPTIMIZERS_TABLE[run.train.optim]
    master = 4 if train_b == 2 else 0  # fp32 master copy of a 16-bit parameter (O2)
    moment_b = train_b if opt.moments_follow_param_dtype and train_b == 2 else 4
    optimizer = trainable * (opt.moments_per_param * moment_b + master)
    # Python updates allocate temporaries the size of the parameter being updated; the
    # largest trainable tensor bounds them (the embedding or head in full fine-tuning).
    if full:
        largest = max(counts.lm_head or counts.embedding, 1) / tp
    else:
        largest = counts.adapter_per_layer / max(len(counts.targets), 1) / tp
    transient = OPTIMIZER_PY_TEMPORARIES * largest * 4 if opt.python_update else 0.0
    if stage >= 1:
        optimizer /= lay.sharding
    if stage >= 2:
        gradients /= lay.sharding
    if stage >= 3:
        weights /= lay.sharding
    if run.parallel.offload and stage >= 2:
        # Paddle's group-sharded offload keeps the fp32 master weights and AdamW moments on
        # the host; stage 3 also its weight and gradient shards, gathering a layer (and
        # prefetching the next) onto the device as it runs.
        optimizer = 0.0
        if stage >= 3:
            layer = max(2 * counts.per_layer, counts.lm_head or counts.embedding) / tp
            weights = min(weights, layer * base_b)
            gradients = min(gradients, layer * train_b) if full else gradients
    return ParameterStates(weights, reference, gradients, optimizer, transient)


def activation_bytes(dtype: str, device: str) -> int:
    """Bytes of one activation element: the compute dtype on GPU, fp32 on CPU."""
    return 4 if dtype == "float32" or device == "cpu" else 2


@dataclass
class Activations:
    """Bytes autograd keeps for backward per micro-batch in flight (see the module
    docstring), without and with recompute, and one decoder layer's forward working set
    (what a no-grad forward, the evaluation pass, holds at once)."""

    plain: float
    recompute: float
    layer_forward: float


def layer_elements(run: RunConfig, lay: Layout, tokens: int, device: str):
    """Elements of one layer's per-token terms (h, kv_dim, intermediate, heads x seq) for
    ``tokens`` tokens, split as tensor parallelism does."""
    a, tp = run.model.arch, lay.tensor
    h, kv, ffn = a.hidden_size, kv_dim(run.model), ffn_width(run.model)
    path = attention_path(run.model, run.data.packing, device)
    scores = ACT_PER_LAYER_SCORES * a.num_attention_heads * lay.seq_len if path.scores_kept else 0.0

    def elements(c_h: float, c_kv: float, c_ffn: float, c_scores: float) -> float:
        replicated = min(ACT_TP_REPLICATED_H, c_h) * h
        split = c_h * h - replicated + c_kv * kv + c_ffn * ffn + c_scores * scores
        return (replicated / (tp if run.parallel.sequence_parallel else 1) + split / tp) * tokens

    return elements, scores


def activations(run: RunConfig, lay: Layout, device: str, full: bool) -> Activations:
    """Activation bytes of the training step. On CPU the vocabulary terms (the softmax kept
    for the loss and the logits gradient) are part of the fitted coefficients; on GPU they
    are the separate ``logits`` line (``logits_bytes``)."""
    a, tp, layers = run.model.arch, lay.tensor, lay.layers_per_stage
    tokens = lay.micro_batch * lay.seq_len
    act_b = activation_bytes(run.precision.dtype, device)
    per_token_layer, scores = layer_elements(run, lay, tokens, device)
    fast_h, fast_kv, fast_outside = _fast_cpu_layer_terms(run, device)
    per_layer = per_token_layer(
        ACT_PER_LAYER_H + fast_h,
        ACT_PER_LAYER_KV + fast_kv,
        ACT_PER_LAYER_FFN,
        ACT_PER_LAYER_SCORES,
    )
    granularity = run.train.recompute_granularity
    kept_h, kept_kv, kept_ffn, kept_scores = ACT_KEPT[granularity]
    if fast_h:  # what the recomputed block leaves of the fast layers' extra (see there)
        extra_h, extra_kv = FAST_LAYERS_KEPT[granularity]
        kept_h, kept_kv = kept_h + extra_h, kept_kv + extra_kv
    kept = per_token_layer(kept_h, kept_kv, kept_ffn, kept_scores)
    vocab = _vocab_shard(run, lay) if device == "cpu" else 0.0
    outside_h = ACT_OUTSIDE_H + fast_outside
    outside = (outside_h * a.hidden_size + ACT_OUTSIDE_VOCAB * vocab) * tokens
    transient = max(scores / tp, vocab) * tokens
    flight = lay.micro_batches_in_flight
    plain = (layers * per_layer * flight + outside + transient) * act_b
    # Layers that keep everything under recompute: train.no_recompute_layers (those on the
    # first stage, the busiest), and layer 0 when its input needs no gradient (frozen
    # embeddings: LoRA, QLoRA) for full and full_attn, which test the layer's input;
    # core_attn tests q/k/v, which an adapter or full fine-tuning makes trainable.
    whole = {i for i in run.train.no_recompute_layers or [] if i in range(layers)}
    if not full and lay.pipeline == 1 and granularity in ("full", "full_attn"):
        whole.add(0)
    refined = 0.0
    for op, skip in parse_refined_recompute(run.train.refined_recompute).items():
        n = layers if skip < 0 else min(skip, layers)
        extra = a.num_attention_heads * tokens / tp if op == "flash_attn" else 0.0
        refined += n * (per_token_layer(*REFINED_KEPT[op]) + extra)
    # Backward recomputes one block at a time: a whole layer (full), the attention block
    # (full_attn) or the attention core (core_attn) is live again on top of what is kept.
    recomputed = per_layer if granularity == "full" else per_layer - kept
    recompute = (
        ((layers - len(whole)) * kept + len(whole) * per_layer + refined) * flight
        + recomputed
        + outside
        + transient
    ) * act_b
    return Activations(plain, recompute, per_layer * act_b)


def _fast_cpu_layer_terms(run: RunConfig, device: str) -> tuple[float, float, float]:
    """What the CPU fast path's RMSNorm and rotary layouts keep beyond PaddleNLP's layers
    (``ftlab.models.cpu_layers``): (per layer h, per layer kv, outside h) coefficients,
    zero where they do not run (GPU, ``launch.cpu_fast_path=false``, another family, or
    not float32)."""
    if (
        device != "cpu"
        or not run.launch.cpu_fast_path
        or run.model.family not in cpu_layers.FAST_FAMILIES
        or run.precision.dtype != "float32"
    ):
        return 0.0, 0.0, 0.0
    per_h, per_kv = cpu_layers.EXTRA_PER_LAYER
    return float(per_h), float(per_kv), float(cpu_layers.EXTRA_OUTSIDE_H)


def _vocab_shard(run: RunConfig, lay: Layout) -> float:
    """Logit columns one device computes: the vocabulary split by tensor parallelism when
    it divides evenly (PaddleNLP's vocab-parallel head), else all of it."""
    v, tp = run.model.arch.vocab_size, lay.tensor
    return v / tp if v % tp == 0 else float(v)


def logits_bytes(run: RunConfig, lay: Layout, batch: int, training: bool) -> float:
    """The logits and the loss of one micro-batch on GPU: ``batch x seq x vocab`` elements
    in LOGITS_COPIES (16-bit logits and fp32 loss tensors, see there); the evaluation pass
    (no backward) holds LOGITS_EVAL_COPIES."""
    copies16, copies32 = LOGITS_COPIES if training else LOGITS_EVAL_COPIES
    act_b = activation_bytes(run.precision.dtype, "gpu")
    elements = batch * lay.seq_len * _vocab_shard(run, lay)
    return elements * (copies16 * act_b + copies32 * 4)


def evaluation_peak(run: RunConfig, lay: Layout, device: str, states: ParameterStates) -> float:
    """Bytes on the busiest device during the evaluation pass: what training keeps resident
    (weights, reference, gradients, optimizer states) plus a no-grad forward of
    ``per_device_eval_batch_size`` rows: one layer's working set, its masks and (GPU) the
    logits and loss. Nothing is kept for backward, but the logits are full-vocabulary."""
    batch = run.train.per_device_eval_batch_size
    per_token_layer, _ = layer_elements(run, lay, batch * lay.seq_len, device)
    act_b = activation_bytes(run.precision.dtype, device)
    layer = per_token_layer(
        ACT_PER_LAYER_H, ACT_PER_LAYER_KV, ACT_PER_LAYER_FFN, ACT_PER_LAYER_SCORES
    )
    if device == "cpu":
        head = (ACT_OUTSIDE_VOCAB + 1) * _vocab_shard(run, lay) * batch * lay.seq_len * act_b
    else:
        head = logits_bytes(run, lay, batch, training=False)
    path = attention_path(run.model, run.data.packing, device)
    row = path.collated_mask_bytes(lay.seq_len) + path.model_mask_bytes(lay.seq_len, act_b)
    resident = states.weights + states.reference + states.gradients + states.optimizer
    return resident + max(layer * act_b, head) + row * batch


def communicators(lay: Layout) -> int:
    """NCCL communicators a process holds: one per parallel group of more than one rank
    (data, tensor, pipeline, sharding, expert) and the global one when there are peers."""
    groups = (lay.data, lay.tensor, lay.pipeline, lay.sharding, lay.expert)
    return (sum(1 for g in groups if g > 1) + 1) if lay.world_size > 1 else 0


def gpu_runtime_bytes(lay: Layout) -> float:
    """Device memory of one process outside its tensors: the CUDA context with Paddle's
    kernels loaded, cuBLAS/cuDNN workspaces, and NCCL's buffers per communicator."""
    mib = GPU_RUNTIME.cuda_context_mib + GPU_RUNTIME.workspaces_mib
    return (mib + GPU_RUNTIME.nccl_per_communicator_mib * communicators(lay)) * MIB


def estimate_memory(
    run: RunConfig,
    counts: ParamCounts,
    lay: Layout,
    device: str,
    adapter_plan: AdapterPlan | None = None,
    stage_plan: StagePlan | None = None,
) -> Memory:
    """Bytes on the busiest device (the module docstring states the model)::

        training  = masks + weights + reference + gradients + optimizer
                    + max(activations [+ logits on GPU], optimizer transient)
                    (offload_optim: the states join the transient side of the max)
        evaluation = weights + reference + gradients + optimizer
                    + max(one layer's forward, logits and loss) of the eval batch
        CPU  needed = training + CPU_RUNTIME_BASELINE (peak RSS)
        GPU  needed = max(training, evaluation) x (1 + allocator reserve)
                    + CUDA context + workspaces + NCCL buffers      (nvidia-smi)

    ``activations`` uses ``train.recompute`` as configured; both variants are reported.
    """
    plan = adapter_plan if adapter_plan is not None else get_method(run.method.name).plan(run)
    stage_plan = stage_plan if stage_plan is not None else get_stage(run.stage.name).plan(run)
    states = parameter_states(run, counts, lay, plan, stage_plan)
    act = activations(run, lay, device, plan.trains_base)
    gpu = device != "cpu"
    logits = logits_bytes(run, lay, lay.micro_batch, training=True) if gpu else 0.0
    act_b = activation_bytes(run.precision.dtype, device)
    masks = attention_mask_bytes(attention_path(run.model, run.data.packing, device), lay, act_b)
    resident = masks + states.weights + states.reference + states.gradients
    step = states.optimizer + states.optimizer_transient
    if run.train.offload_optim:
        # States live in host memory and come back for the step, when the activations of
        # the micro-batch are already freed: the peak is the larger of the two phases.
        total = resident + max(act.plain + logits, step)
        total_rc = resident + max(act.recompute + logits, step)
    else:
        kept = resident + states.optimizer
        total = kept + max(act.plain + logits, states.optimizer_transient)
        total_rc = kept + max(act.recompute + logits, states.optimizer_transient)
    total += stage_plan.extra_bytes  # e.g. GRPO's generation KV cache and group logits
    total_rc += stage_plan.extra_bytes
    in_use = total_rc if run.train.recompute else total
    eval_peak = evaluation_peak(run, lay, device, states)
    if gpu:
        allocated = max(in_use, eval_peak)
        reserve = GPU_RUNTIME.allocator_reserve * allocated
        runtime = gpu_runtime_bytes(lay)
        needed = allocated + reserve + runtime
        baseline, rss = 0.0, None
    else:
        reserve = runtime = 0.0
        baseline = CPU_RUNTIME_BASELINE_MIB * MIB
        rss = in_use + baseline
        needed = rss
    return Memory(
        weights=states.weights,
        gradients=states.gradients,
        optimizer=states.optimizer,
        activations=act.plain,
        activations_recompute=act.recompute,
        attention_masks=masks,
        total=total,
        total_recompute=total_rc,
        in_use=in_use,
        runtime_baseline=baseline,
        estimated_rss=rss,
        reference=states.reference,
        logits=logits,
        evaluation=eval_peak,
        allocator_reserve=reserve,
        gpu_runtime=runtime,
        needed=needed,
        training_reserved=(in_use * (1 + GPU_RUNTIME.allocator_reserve) + runtime) if gpu else None,
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
        "layout": lay.to_dict(),
        "parameters": {k: v for k, v in asdict(counts).items() if k != "targets"},
        "memory_bytes": asdict(mem),
        "memory_mib": {k: None if v is None else round(v / MIB, 1) for k, v in asdict(mem).items()},
        "eval_batch_size": run.train.per_device_eval_batch_size,
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
        *(
            [f"  logits and loss      {mib(mem['logits'])} (micro x seq x vocab, fp32 loss)"]
            if mem.get("logits")
            else []
        ),
        f"  total                {mib(mem['total'])} without recompute{no_rc}",
        f"                       {mib(mem['total_recompute'])} with recompute{rc}",
        *device_lines(plan, mib),
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


def device_lines(plan: dict[str, Any], mib: Any) -> list[str]:
    """The evaluation pass and, on GPU, what the device must have beyond its tensors."""
    mem = plan["memory_mib"]
    if mem.get("needed") is None:  # a plan.json written before these terms existed
        return []
    batch = plan.get("eval_batch_size")
    lines = [f"  evaluation pass      {mib(mem['evaluation'])} (eval batch {batch}, no backward)"]
    if plan["device"] == "cpu":
        return lines
    reserve = 100 * GPU_RUNTIME.allocator_reserve
    return lines + [
        f"  allocator reserve    {mib(mem['allocator_reserve'])} ({reserve:.0f}% of the larger "
        "of training and evaluation)",
        f"  CUDA/NCCL runtime    {mib(mem['gpu_runtime'])} (context, workspaces, NCCL buffers)",
        f"  GPU needed           {mib(mem['needed'])} reserved (as nvidia-smi shows it; "
        f"training steps alone {mib(mem['training_reserved'])})",
    ]


def optimizer_label(plan: dict[str, Any]) -> str:
    opt = plan["optimizer"]
    return opt["label"] + (", offloaded between steps" if opt["offload"] else "")


def step_time_assumptions(plan: dict[str, Any]) -> list[str]:
    """An uncalibrated cost profile behind the step-time estimate, said as an assumption."""
    section = plan.get("estimate") or plan.get("auto") or {}
    hw = section.get("hardware") if isinstance(section, dict) else None
    if not hw or hw.get("mfu_calibration") != "uncalibrated":
        return []
    return [
        f"step time: the {hw['accelerator']} profile is uncalibrated (MFU {hw['mfu']:g} assumed, "
        "no published step times; set launch.mfu from a short run, docs/plan-calibration.md)"
    ]


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

    plan = make_plan(run, derived, env.device)
    plan.update(extra or {})
    plan["assumptions"] += step_time_assumptions(plan)
    disk = plan_disk(run, derived.world_size, env.described, run_dir.path)
    plan["disk"] = disk.to_dict()
    plan["run_dir"] = str(run_dir)
    run_dir.write_text(PLAN, json.dumps(plan, indent=2) + "\n")
    warning = disk_warning(disk)
    lines = format_plan(plan).splitlines() + disk_lines(disk) + list(extra_lines or [])
    lines += [f"warning: {warning}"] if warning else []
    print("\nftlab plan\n" + "\n".join("  " + x for x in lines), flush=True)
    return plan


# --------------------------------------------------------------------------- one layout on
# described devices: whether it fits and its step time (mode=plan, and every candidate of
# parallel=auto's search)


def evaluate(
    run: RunConfig,
    env: Environment,
    hw: Hardware,
    cand: Candidate,
    choice: RecomputeChoice,
    counts: ParamCounts,
    adapter: AdapterPlan,
) -> Candidate:
    """The candidate's memory from the plan and, when it fits, its step time."""
    crun = candidate_run(run, cand, choice)
    derived = Derived(
        device=env.device,
        world_size=cand.world_size,
        nproc_per_node=cand.nproc_per_node,
        data_parallel_degree=cand.data,
        global_batch_size=(cand.micro_batch or 0)
        * (cand.accumulation or 0)
        * cand.data_parallel_world,
    )
    mem = estimate_memory(crun, counts, layout(crun, derived), env.device, adapter)
    need = mem.needed / GIB  # CPU: estimated peak RSS; GPU: reserved, runtime included
    usable = hw.usable_gib(cand.nproc_per_node, run.parallel.auto.memory_margin)
    need, usable = round(need, 3), round(usable, 3)  # decided on the figures it records
    cand = replace(cand, memory_gib=need, usable_gib=usable)
    if need > usable:
        return replace(
            cand,
            kind=MEMORY,
            reason=f"needs {need:.1f} GiB per device, has {usable:.1f}",
        )
    forward_share, collective_share = choice.shares(run)
    shape = Shape(
        **cand.as_kwargs(),
        recompute=forward_share,
        recompute_collectives=collective_share,
        micro_batch=cand.micro_batch or 0,
        accumulation=cand.accumulation or 0,
        seq_len=run.data.max_length,
    )
    step = step_time(crun, counts, adapter, shape, hw)
    tokens = (cand.micro_batch or 0) * (cand.accumulation or 0) * cand.data_parallel_world
    tokens *= run.data.max_length
    return replace(
        cand, step=step.to_dict(), tokens_per_second=round(tokens / step.total, 1), reason=""
    )


def layout_estimate(
    run: RunConfig, env: Environment, decision: Decision | None, notes: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """What ``mode=plan`` adds to its plan: parallel=auto's ranking, or for a named layout
    whether it fits and its estimated step time on the described devices."""
    if decision is not None:
        return {"auto": decision.to_dict()}, format_decision(
            decision, run.parallel.auto.show
        ).splitlines()
    p, t = run.parallel, run.train
    try:
        hw = resolve_hardware(run, env, processes_per_node(p))
    except ConfigError as err:
        return {"estimate": None}, [f"estimate        n/a: {err}"]
    choice = recompute_choice_of(run)
    cand = Candidate(
        **parallel_degrees(p, hw.nnodes, hw.devices_per_node).as_kwargs(),
        recompute=choice.label,
        micro_batch=t.per_device_train_batch_size,
        accumulation=t.gradient_accumulation_steps,
    )
    adapter = get_method(run.method.name).plan(run)
    cand = evaluate(run, env, hw, cand, choice, count_parameters(run, adapter), adapter)
    margin = AutoLayoutSettings().memory_margin
    if cand.kind:
        verdict = f"does not fit: {cand.reason} ({margin:.0%} margin)"
    else:
        verdict = (
            f"fits ({gib(cand.memory_gib)} of {gib(cand.usable_gib)} usable, {margin:.0%} "
            f"margin); step {cand.step_seconds:.4g} s = {cand.step_breakdown}; "
            f"{cand.tokens_per_second:,.0f} tokens/s"
        )
    lines = [f"estimate       on {hw.describe()}", f"               {verdict}"]
    figures = notes + assumed_sources(hw)
    lines += [f"{'figures' if i == 0 else '':<14} {n}" for i, n in enumerate(figures)]
    return {"estimate": {"hardware": hw.to_dict(), **asdict(cand)}}, lines
