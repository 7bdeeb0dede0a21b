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
stage 1 divides optimizer states, stage 2 also gradients, stage 3 also weights.

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
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config.schema import LoraMethodConfig, ModelConfig, QLoraMethodConfig, RunConfig
from ftlab.errors import ConfigError

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

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FOUR_BIT = ("nf4", "fp4", "int4")
DOUBLE_QUANT_BLOCK = 256


@dataclass(frozen=True)
class Linear:
    name: str  # full sublayer name, as PaddleNLP's target_modules regexes see it
    fan_in: int
    fan_out: int
    layer: int | None  # decoder layer index; None for the LM head

    @property
    def size(self) -> int:
        return self.fan_in * self.fan_out


def head_dim(model: ModelConfig) -> int:
    a = model.arch
    if a.hidden_size % a.num_attention_heads:
        raise ConfigError(
            f"model.arch.hidden_size={a.hidden_size} is not a multiple of "
            f"num_attention_heads={a.num_attention_heads}; fix model.arch."
        )
    return a.hidden_size // a.num_attention_heads


def model_linears(model: ModelConfig) -> list[Linear]:
    """Every linear layer of the decoder (and the LM head), named like PaddleNLP's."""
    a = model.arch
    h, i, kv = a.hidden_size, a.intermediate_size, a.num_key_value_heads * head_dim(model)
    prefix = "qwen2" if model.family == "qwen2" else "llama"
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    out = []
    for layer in range(a.num_hidden_layers):
        for name in LINEARS:
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            fan_in, fan_out = shapes[name]
            out.append(Linear(f"{prefix}.layers.{layer}.{block}.{name}", fan_in, fan_out, layer))
    if not a.tie_word_embeddings:
        out.append(Linear("lm_head", h, a.vocab_size, None))
    return out


@dataclass
class ParamCounts:
    total: int  # every parameter of the base model (+ adapter)
    trainable: int
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    per_layer: int  # one decoder layer, norms and biases included
    norms_and_biases_per_layer: int
    final_norm: int
    adapter: int  # LoRA parameters (0 for full fine-tuning)
    adapter_per_layer: int
    quantized: int  # base parameters stored quantized (QLoRA target linears)
    quantized_per_layer: int
    quantized_lm_head: int
    targets: list[str] = field(default_factory=list)  # short names of the adapted linears


def lora_targets(run: RunConfig) -> list[str]:
    m = run.method
    return list(m.target_modules or run.model.lora_target_modules)


def lora_size(m: LoraMethodConfig, lin: Linear) -> int:
    """LoRA parameters PaddleNLP creates for one linear (MoRA: one square matrix)."""
    r = m.lora_rank
    if m.use_mora:
        r_hat = int(math.sqrt((lin.fan_in + lin.fan_out) * r) + 0.5) // 2 * 2
        return r_hat * r_hat
    return r * (lin.fan_in + lin.fan_out) + (r * r if m.lora_use_mixer else 0)


def count_parameters(run: RunConfig) -> ParamCounts:
    """Parameter counts of the model as ``model.arch`` describes it, for the chosen method."""
    model, a = run.model, run.model.arch
    h = a.hidden_size
    linears = model_linears(model)
    layer_linears = [x for x in linears if x.layer == 0]
    kv = a.num_key_value_heads * head_dim(model)
    # Two RMSNorm weights per layer; Qwen2 adds q/k/v biases.
    norms_biases = 2 * h + ((h + 2 * kv) if model.family == "qwen2" else 0)
    per_layer = sum(x.size for x in layer_linears) + norms_biases
    embedding = a.vocab_size * h
    lm_head = 0 if a.tie_word_embeddings else a.vocab_size * h
    base = embedding + lm_head + a.num_hidden_layers * per_layer + h
    counts = ParamCounts(
        total=base,
        trainable=base,
        embedding=embedding,
        lm_head=lm_head,
        per_layer=per_layer,
        norms_and_biases_per_layer=norms_biases,
        final_norm=h,
        adapter=0,
        adapter_per_layer=0,
        quantized=0,
        quantized_per_layer=0,
        quantized_lm_head=0,
    )
    method = run.method
    if method.name == "full":
        return counts
    if not isinstance(method, LoraMethodConfig):
        raise ConfigError(
            f"mode=plan has no parameter model for method={method.name}; it covers full, "
            "lora (and its variants) and qlora. Measure that method with a short "
            "train.max_steps run instead, or add its counts to ftlab/plan.py."
        )
    patterns = [re.compile(p) for p in lora_targets(run)]
    targeted = [x for x in linears if any(p.fullmatch(x.name) for p in patterns)]
    if not targeted:
        raise ConfigError(
            f"method.target_modules / model.lora_target_modules {lora_targets(run)} match no "
            f"linear layer of model {model.name} (names look like {linears[0].name})."
        )
    adapter = sum(lora_size(method, x) for x in targeted)
    counts.adapter = adapter
    counts.adapter_per_layer = sum(lora_size(method, x) for x in targeted if x.layer == 0)
    counts.total = base + adapter
    counts.trainable = adapter
    counts.targets = sorted({x.name.rsplit(".", 1)[-1] for x in targeted})
    if isinstance(method, QLoraMethodConfig):
        counts.quantized = sum(x.size for x in targeted)
        counts.quantized_per_layer = sum(x.size for x in targeted if x.layer == 0)
        counts.quantized_lm_head = sum(x.size for x in targeted if x.layer is None)
    return counts


def quantized_bytes_per_param(m: QLoraMethodConfig) -> float:
    """Codes + block scales per quantized parameter (ftlab's blockwise layout)."""
    codes = 0.5 if m.quant_algo in FOUR_BIT else 1.0
    if m.double_quant:
        scales = (1.0 + 8.0 / DOUBLE_QUANT_BLOCK) / m.quant_block_size
    else:
        scales = 4.0 / m.quant_block_size
    return codes + scales


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


def layout(run: RunConfig, derived: dict[str, Any]) -> Layout:
    p, t = run.parallel, run.train
    layers = math.ceil(run.model.arch.num_hidden_layers / p.pipeline)
    return Layout(
        world_size=derived["world_size"],
        nproc_per_node=derived["nproc_per_node"],
        nnodes=run.launch.nnodes,
        data=derived["data_parallel_degree"],
        tensor=p.tensor,
        pipeline=p.pipeline,
        sharding=p.sharding,
        sharding_stage=p.sharding_stage,
        sequence_parallel=p.sequence_parallel,
        micro_batch=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        global_batch=derived["global_batch_size"],
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


def _weight_bytes(run: RunConfig) -> tuple[int, int]:
    """(bytes per base weight, bytes per trainable adapter weight)."""
    half = run.precision.amp_level == "O2" and run.precision.dtype != "float32"
    base = 2 if half else 4
    adapter = 4 if isinstance(run.method, QLoraMethodConfig) else base
    return base, adapter


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
    linear = counts.per_layer - norms - counts.quantized_per_layer
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
    return floats, quant, adapter


def estimate_memory(run: RunConfig, counts: ParamCounts, lay: Layout, device: str) -> Memory:
    a, p = run.model.arch, run.parallel
    h, v, heads = a.hidden_size, a.vocab_size, a.num_attention_heads
    kv = a.num_key_value_heads * head_dim(run.model)
    tp, stage = lay.tensor, lay.sharding_stage
    base_b, adapter_b = _weight_bytes(run)
    full = run.method.name == "full"
    layers = lay.layers_per_stage

    qbytes = quantized_bytes_per_param(run.method) if counts.quantized else 0.0
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


def make_plan(run: RunConfig, derived: dict[str, Any], device: str) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what ``plan.json`` holds)."""
    counts = count_parameters(run)
    lay = layout(run, derived)
    mem = estimate_memory(run, counts, lay, device)
    method: dict[str, Any] = {"name": run.method.name}
    if isinstance(run.method, LoraMethodConfig):
        method.update(lora_rank=run.method.lora_rank, targets=counts.targets)
    if isinstance(run.method, QLoraMethodConfig):
        method.update(
            quant_algo=run.method.quant_algo,
            quant_block_size=run.method.quant_block_size,
            double_quant=run.method.double_quant,
            quantized_bytes_per_param=quantized_bytes_per_param(run.method),
            quantized_base_bytes=counts.quantized * quantized_bytes_per_param(run.method),
        )
    return {
        "model": run.model.name,
        "device": device,
        "precision": {"dtype": run.precision.dtype, "amp_level": run.precision.amp_level},
        "method": method,
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
    if method.get("targets"):
        lines.append(
            f"adapter        LoRA rank {method['lora_rank']} on {', '.join(method['targets'])}"
        )
    if "quant_algo" in method:
        lines.append(
            f"quantized base {par['quantized']:,} params as {method['quant_algo']} "
            f"(block {method['quant_block_size']}"
            f"{', double quant' if method['double_quant'] else ''}): "
            f"{method['quantized_bytes_per_param']:.4f} B/param, "
            f"{mib(method['quantized_base_bytes'] / MIB)}"
        )
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


def print_plan(run: RunConfig, derived: dict[str, Any], env: Any, run_dir: Path) -> dict[str, Any]:
    """Print the plan and write ``plan.json`` into the run dir; loads no weights."""
    plan = make_plan(run, derived, env.device)
    plan["run_dir"] = str(run_dir)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(
        "\nftlab plan\n" + "\n".join("  " + x for x in format_plan(plan).splitlines()), flush=True
    )
    return plan


def plan_environment(run: RunConfig) -> Any:
    """The machine to plan for: this one, or with ``device=gpu`` the GPUs the layout needs.

    A plan loads nothing, so a GPU layout can be planned on a CPU-only machine: the
    environment then has exactly the GPUs the layout asks for (per node) and an unknown
    compute capability (bf16 support is not checked).
    """
    from ftlab.config.validate import Environment, probe_environment

    if run.device != "gpu":
        return probe_environment(run.device)
    import paddle

    p = run.parallel
    nproc = p.nproc_per_node or p.tensor * p.pipeline * p.sharding * (p.data or 1)
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return probe_environment("gpu")
    return Environment("gpu", nproc, paddle.__version__, None)
