"""``ftlab mode=plan``: layout, parameter counts and a per-device memory estimate.

Nothing is loaded: the numbers come from ``model.arch`` and the settings, so a plan for
Llama-3-8B on eight GPUs can be made on a laptop before any GPU hours are spent.

The memory model (bytes on the busiest device):

* **weights**: every parameter in the weight dtype (fp32; 16-bit under AMP O2); for QLoRA
  the target linears as packed codes + block scales, LoRA factors in fp32.
* **gradients**: trainable parameters in their own dtype.
* **optimizer**: AdamW's two fp32 moments per trainable parameter, plus an fp32 master copy
  of every 16-bit trainable parameter (AMP O2, ``multi_precision``).
* **activations**: tensors autograd keeps for backward, per micro-batch of
  ``per_device_train_batch_size`` x ``data.max_length`` tokens (the longest a batch can be).
  Per token and layer: ``12h + 2*kv_dim + 3*intermediate`` elements, plus
  ``heads * seq_len`` for the softmax output of eager (non-flash) attention; outside the
  layers ``3.3h + vocab`` (final norm, the softmax kept for the loss). These coefficients were
  fitted to Paddle's CPU allocator counts for PaddleNLP's eager Llama (fp32) and reproduce
  them within 2% (``bench/plan_vs_measured.py --fit``). Full recompute keeps one ``h``
  per token and layer plus one layer being recomputed; PaddleNLP does not recompute the first
  layer when its input needs no gradient (frozen embeddings: LoRA, QLoRA), so that layer
  keeps all of its activations. A transient of the largest temporary (attention scores or
  logits gradient) is added.

Splits: tensor parallel divides linear and vocab weights by ``tensor`` (norms are
replicated) and the activations except a replicated ``6h`` per token and layer (also split
with sequence parallel); pipeline parallel keeps ``ceil(layers / pipeline)`` layers, plus
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
from ftlab.config.environment import Environment, has_gpu, probe_environment
from ftlab.config.schema import RunConfig
from ftlab.methods.catalog import get_method
from ftlab.methods.registry import AdapterPlan
from ftlab.models.arch import base_counts, head_dim
from ftlab.record.rundir import PLAN, RunDir

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
ACT_PER_LAYER_SCORES = 1.0  # x heads x seq_len, eager attention only
ACT_OUTSIDE_H = 3.3
ACT_OUTSIDE_VOCAB = 1.0  # the softmax kept for the loss gradient
ACT_TP_REPLICATED_H = 6.0  # of ACT_PER_LAYER_H, not split by tensor parallelism
OPTIMIZER_MOMENTS = 2  # AdamW: first and second moment, fp32


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
    activations_recompute: float
    total: float
    total_recompute: float
    in_use: float  # total with train.recompute as configured
    runtime_baseline: float  # CPU only: the process baseline added to estimate RSS
    estimated_rss: float | None  # CPU only: in_use + runtime_baseline


def _weight_bytes(run: RunConfig, adapter_plan: AdapterPlan) -> tuple[int, int]:
    """(bytes per base weight, bytes per trainable adapter weight)."""
    half = run.precision.amp_level == "O2" and run.precision.dtype != "float32"
    base = 2 if half else 4
    return base, (4 if adapter_plan.adapter_fp32 else base)


def _stage_params(
    counts: ParamCounts, num_layers: int, lay: Layout, which: str
) -> tuple[float, float, float]:
    """(float, quantized, adapter) parameters on one device of a pipeline stage.

    ``only``: no pipeline. ``first``: its layers + the embedding. ``last``: its layers +
    the LM head (a copy of the embedding when tied) + the final norm. Tensor parallelism
    splits linears and the vocabulary dimension; norms and biases are replicated.
    """
    tp, layers = lay.tensor, lay.layers_per_stage
    norms = counts.norms_and_biases_per_layer
    linear = counts.per_layer - norms - counts.quantized_per_layer + counts.frozen_added_per_layer
    floats = layers * (linear / tp + norms)
    quant = layers * counts.quantized_per_layer / tp
    adapter = layers * counts.adapter_per_layer / tp
    head_adapter = (counts.adapter - num_layers * counts.adapter_per_layer) / tp
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
        floats += (counts.frozen_added - num_layers * counts.frozen_added_per_layer) / tp
    return floats, quant, adapter


def estimate_memory(
    run: RunConfig,
    counts: ParamCounts,
    lay: Layout,
    device: str,
    adapter_plan: AdapterPlan | None = None,
) -> Memory:
    a, p = run.model.arch, run.parallel
    h, v, heads = a.hidden_size, a.vocab_size, a.num_attention_heads
    kv = a.num_key_value_heads * head_dim(run.model)
    tp, stage = lay.tensor, lay.sharding_stage
    plan = adapter_plan if adapter_plan is not None else get_method(run.method.name).plan(run)
    base_b, adapter_b = _weight_bytes(run, plan)
    full = plan.trains_base
    layers = lay.layers_per_stage

    qbytes = plan.quantized_bytes_per_param if counts.quantized else 0.0
    stages = [
        _stage_params(counts, a.num_hidden_layers, lay, which)
        for which in (("only",) if lay.pipeline == 1 else ("first", "last"))
    ]
    # The busiest stage: the one whose parameters take the most bytes.
    stage_float, stage_quant, adapter = max(
        stages, key=lambda x: x[0] * base_b + x[1] * qbytes + x[2] * adapter_b
    )
    weights = stage_float * base_b + stage_quant * qbytes + adapter * adapter_b
    trainable = stage_float if full else adapter
    train_b = base_b if full else adapter_b
    gradients = trainable * train_b
    master = 4 if train_b == 2 else 0
    optimizer = trainable * (OPTIMIZER_MOMENTS * 4 + master)
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
    flash = run.model.flash_attention
    scores = 0.0 if flash else ACT_PER_LAYER_SCORES * heads * lay.seq_len
    replicated = ACT_TP_REPLICATED_H * h
    split = (
        ACT_PER_LAYER_H * h
        - replicated
        + ACT_PER_LAYER_KV * kv
        + ACT_PER_LAYER_FFN * a.intermediate_size
        + scores
    )
    per_layer = (replicated / (tp if p.sequence_parallel else 1) + split / tp) * tokens
    layer_input = h * tokens / (tp if p.sequence_parallel else 1)
    vocab = v / tp if v % tp == 0 else v
    outside = (ACT_OUTSIDE_H * h + ACT_OUTSIDE_VOCAB * vocab) * tokens
    transient = max(scores / tp, vocab) * tokens
    flight = lay.micro_batches_in_flight
    act = (layers * per_layer * flight + outside + transient) * act_b
    frozen_input = not full  # embeddings frozen: PaddleNLP skips recomputing layer 0
    kept_full = (1 if frozen_input and lay.pipeline == 1 else 0) * per_layer
    act_rc = ((layers * layer_input + kept_full) * flight + per_layer + outside + transient) * act_b

    total = weights + gradients + optimizer + act
    total_rc = weights + gradients + optimizer + act_rc
    in_use = total_rc if run.train.recompute else total
    baseline = CPU_RUNTIME_BASELINE_MIB * MIB if device == "cpu" else 0.0
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=act,
        activations_recompute=act_rc,
        total=total,
        total_recompute=total_rc,
        in_use=in_use,
        runtime_baseline=baseline,
        estimated_rss=in_use + baseline if device == "cpu" else None,
    )


def make_plan(run: RunConfig, derived: Derived, device: str) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what ``plan.json`` holds)."""
    adapter = get_method(run.method.name).plan(run)
    counts = count_parameters(run, adapter)
    lay = layout(run, derived)
    mem = estimate_memory(run, counts, lay, device, adapter)
    return {
        "model": run.model.name,
        "device": device,
        "precision": {"dtype": run.precision.dtype, "amp_level": run.precision.amp_level},
        "method": {"name": run.method.name, **adapter.details},
        "method_lines": adapter.lines,
        "layout": asdict(lay),
        "parameters": {k: v for k, v in asdict(counts).items() if k != "targets"},
        "memory_bytes": asdict(mem),
        "memory_mib": {k: None if v is None else round(v / MIB, 1) for k, v in asdict(mem).items()},
        "recompute": run.train.recompute,
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
        + (", sequence parallel" if lay["sequence_parallel"] else ""),
        f"batch          micro {lay['micro_batch']} x seq {lay['seq_len']}, grad accumulation "
        f"{lay['gradient_accumulation_steps']}, global {lay['global_batch']}",
        f"parameters     total {par['total']:,}, trainable {par['trainable']:,} "
        f"({100 * par['trainable'] / par['total']:.2f}%)",
    ]
    lines += plan["method_lines"]
    rc = "  <- train.recompute" if plan["recompute"] else ""
    no_rc = "" if plan["recompute"] else "  <- train.recompute=false"
    lines += [
        "memory / device (busiest device)",
        f"  weights              {mib(mem['weights'])}",
        f"  gradients            {mib(mem['gradients'])}",
        f"  optimizer (AdamW)    {mib(mem['optimizer'])}",
        f"  activations          {mib(mem['activations'])} without recompute, "
        f"{mib(mem['activations_recompute'])} with",
        f"  total                {mib(mem['total'])} without recompute{no_rc}",
        f"                       {mib(mem['total_recompute'])} with recompute{rc}",
    ]
    if mem["estimated_rss"] is not None:
        lines.append(
            f"  CPU peak RSS         {mib(mem['estimated_rss'])} = total + "
            f"{mib(mem['runtime_baseline'])} Python/Paddle runtime baseline (measured once)"
        )
    return "\n".join(lines)


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
    plan["run_dir"] = str(run_dir)
    run_dir.write_text(PLAN, json.dumps(plan, indent=2) + "\n")
    lines = format_plan(plan).splitlines() + list(extra_lines or [])
    print("\nftlab plan\n" + "\n".join("  " + x for x in lines), flush=True)
    return plan


def plan_environment(run: RunConfig) -> Environment:
    """The machine to plan for: this one, or with ``device=gpu`` the GPUs the layout needs.

    A plan loads nothing, so a GPU layout can be planned on a CPU-only machine: the
    environment then has exactly the GPUs the layout asks for (per node) and an unknown
    compute capability (bf16 support is not checked).
    """
    if run.device != "gpu":
        return probe_environment(run.device)
    import paddle

    p = run.parallel
    nproc = p.nproc_per_node or p.tensor * p.pipeline * p.sharding * (p.data or 1)
    if has_gpu():
        return probe_environment("gpu")
    return Environment("gpu", nproc, paddle.__version__, None)
