"""The step-time model ``parallel=auto`` ranks layouts by, and the devices it assumes.

An estimate, stated so it can be checked and calibrated, not a measurement. For one
optimizer step of a candidate layout, on its busiest device:

* **compute**: training FLOPs at ``device_tflops x mfu``. Per token, the forward pass is
  ``2 x`` the matmul parameters of the decoder layers and the LM head (adapters included)
  plus ``4 x seq_len x hidden`` per layer for attention scores and context; the backward
  pass repeats it once for activation gradients and adds ``2 x`` the trainable matmul
  parameters for weight gradients (full fine-tuning: 6 N per token in total, a frozen
  base with adapters: about 4 N); recompute adds one forward of the decoder layers.
  Tensor parallelism divides a stage's FLOPs by its degree; a pipeline stage computes its
  ``ceil(layers / pipeline)`` layers (the last one also the LM head).
* **pipeline bubble**: 1F1B runs ``micro-batches + stages - 1`` micro-batch slots per
  step, so ``stages - 1`` slots of compute are idle.
* **communication**, bytes per device over a ring at the group's bus bandwidth (intra-node
  when the group's ranks share a node, else inter-node; PaddleNLP orders the hybrid groups
  dp, pp, sharding, mp from outermost to innermost): data parallel all-reduces the
  trainable gradients once per step (``2 (n-1)/n`` of their bytes); sharding stage 1
  reduce-scatters them and all-gathers the updated parameters (stage 2 reduce-scatters
  after every micro-batch); stage 3 also all-gathers the weights in every forward and
  backward (and recomputed forward); tensor parallelism all-reduces ``micro x seq x
  hidden`` activations twice per layer in the forward, twice in the backward and twice in
  a recomputed forward, gathers the logits (``tensor_parallel_output=false``) and reduces
  the vocabulary-parallel embedding's output; sequence parallelism replaces each
  all-reduce by an all-gather and a reduce-scatter of the same volume; pipeline stages send
  one activation forward and one gradient back per micro-batch.
* **offload** (sharding stage 2/3 with ``parallel.offload``): the gradient and parameter
  shards cross the host link once per step; stage 3 also copies its weight shard up in
  every forward and backward.

Nothing overlaps in the model (real runs overlap some communication with compute), the
optimizer update, kernel launch overheads and QLoRA's dequantization are not counted.
The constants come from a profile per accelerator (``PROFILES``), each overridable by a
``launch.*`` setting; ``docs/plan.md`` says how to calibrate them against short real runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.distributed.degrees import Degrees
from ftlab.errors import ConfigError
from ftlab.methods.registry import AdapterPlan
from ftlab.planning.counts import ParamCounts


@dataclass(frozen=True)
class Profile:
    """Typical figures for one accelerator (per device)."""

    device: str  # gpu | cpu
    memory_gib: float | None  # None: the probe's (CPU RAM)
    tflops_16: float | None  # dense bf16/fp16 peak; None: 16-bit does not run there
    tflops_32: float  # fp32 matmul peak (TF32 tensor cores on A100/H100/H800)
    mfu: float
    intra_node_gbps: float
    inter_node_gbps: float
    host_gbps: float | None  # None: no separate device memory (no offload)
    # Device memory outside the plan; 0 since the plan counts the CUDA context, workspaces,
    # NCCL buffers and the allocator's reserve itself (ftlab.planning.plan.GPU_RUNTIME).
    reserved_gib: float
    source: str
    # Where ``mfu`` comes from: published (GPU) or measured (CPU) step times this model was
    # fitted to (``calibrate``); None: an assumption, reported as uncalibrated.
    calibration: str | None = None


# The MFU at which this module's step model reproduces published step times, per profile.
# A100: PaddleNLP's pretraining table (llm/docs/pretrain.rst; 8 x A100-80G, bf16 O2, flash
# attention, no recompute, tp2 x sharding4 stage2, 4096 tokens) gives 3755, 1976 and 3607
# tokens/card/s for Llama-2-7B, Llama-2-13B and Qwen-7B: MFU 0.562, 0.572, 0.578 under
# this model (tests/fixtures/published_throughput, bench/plan_vs_published.py
# --throughput). PyTorch LoRA runs on one A100 (QwenLM/Qwen README) imply 0.32-0.55, lower
# for smaller models (per-kernel overheads the model does not count).
A100_MFU = 0.57
A100_CALIBRATION = (
    "MFU 0.57 fitted to PaddleNLP's published A100 pretraining throughputs (Llama-2-7B/13B, "
    "Qwen-7B; tests/fixtures/published_throughput)"
)
# CPU: this machine's measured steps (bench/plan_vs_published.py --cpu): one process of
# the shipped model's dp2 LoRA run (micro-batch 8) spends 0.59, 0.43 and 0.45 CPU seconds
# per step in three measurements (2 vs 12, 2 vs 12, 2 vs 22 steps; CPU time, not wall
# time, as the machine is shared: the same steps took about 2 s of wall time under load).
# The model estimated 0.318 s at MFU 0.1; 0.07 makes it 0.45 s, the median. Measured
# batches are padded to their longest row while the model counts data.max_length tokens,
# so this MFU is per planned token, not per token computed.
CPU_MFU = 0.07
CPU_CALIBRATION = (
    "MFU 0.07 fitted to this 2-core machine's measured CPU seconds per step (shipped "
    "model, LoRA, dp2; bench/plan_vs_published.py --cpu)"
)

# NVIDIA's datasheet peaks (dense, no sparsity); bus bandwidths are typical nccl-tests
# all-reduce figures on 8-GPU SXM nodes (about half of NVLink's bidirectional rate) and one
# InfiniBand port per GPU (HDR 200 Gb/s on A100 nodes, NDR 400 Gb/s on H100/H800) at ~90%;
# host: PCIe 4 (A100) / 5 (H100, H800) x16 at ~80%. The A100 MFU is calibrated (above);
# H100/H800 have no published Paddle step times here, so their MFU (0.4) is an assumption
# the plan reports as uncalibrated; set launch.mfu from a short run (docs/plan-calibration.md).
A100 = Profile(
    "gpu", 80.0, 312.0, 156.0, A100_MFU, 230.0, 22.0, 25.0, 0.0, "A100 SXM4 80GB", A100_CALIBRATION
)
PROFILES: dict[str, Profile] = {
    "a100": A100,
    "a100_40g": replace(A100, memory_gib=40.0, source="A100 SXM4 40GB"),
    "h100": Profile("gpu", 80.0, 989.0, 495.0, 0.4, 450.0, 45.0, 50.0, 0.0, "H100 SXM5 80GB"),
    "h800": Profile("gpu", 80.0, 989.0, 495.0, 0.4, 200.0, 45.0, 50.0, 0.0, "H800 SXM5 80GB"),
    # One gloo process per core of the project's 2-core machine: Paddle's fp32 matmul peak
    # (175 GFLOP/s on 2 cores, PLATFORM_NOTES), an MFU fitted to the shipped model's LoRA
    # run (eager per-op cost dominates tiny models), gloo all-reduce bus bandwidth over
    # loopback measured at 0.3-0.4 GB/s (1-64 MiB), 10 GbE between machines.
    "cpu": Profile(
        "cpu",
        None,
        None,
        0.0875,
        CPU_MFU,
        0.3,
        1.0,
        None,
        0.0,
        "CPU, one gloo process per core",
        CPU_CALIBRATION,
    ),
}
# Planning for GPUs on a machine without one (``device=gpu`` in plan mode): the profile
# and the GPUs per node assumed unless launch.accelerator / parallel.nproc_per_node say.
ASSUMED_GPU = "a100"
ASSUMED_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Hardware:
    """The devices a layout is chosen for, every number with where it came from."""

    accelerator: str  # a profile name
    device: str  # gpu | cpu
    devices_per_node: int
    nnodes: int
    memory_gib: float  # per device; CPU: the machine's RAM, shared by its processes
    tflops: float  # peak for the run's compute dtype
    mfu: float
    intra_node_gbps: float
    inter_node_gbps: float
    host_gbps: float | None
    reserved_gib: float
    sources: dict[str, str] = field(default_factory=dict)  # value -> profile/launch/probe
    # How the MFU was set: the profile's calibration, launch.mfu, or "uncalibrated".
    mfu_calibration: str = "uncalibrated"

    def usable_gib(self, processes_per_node: int, margin: float) -> float:
        """Memory one process may plan to use: the margin and the reserve taken off
        (CPU processes share the machine's RAM)."""
        per_device = self.memory_gib / (processes_per_node if self.device == "cpu" else 1)
        return per_device * (1.0 - margin) - self.reserved_gib

    def describe(self) -> str:
        host = f", host {self.host_gbps:g} GB/s" if self.host_gbps else ""
        return (
            f"{self.nnodes} node(s) x {self.devices_per_node} {self.accelerator} "
            f"({self.memory_gib:.1f} GiB, {self.tflops:g} TFLOP/s peak at MFU {self.mfu:g} "
            f"({'calibrated' if self.mfu_calibration != UNCALIBRATED else UNCALIBRATED}); "
            f"intra-node {self.intra_node_gbps:g} GB/s, inter-node {self.inter_node_gbps:g} "
            f"GB/s{host})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _detected_accelerator(env: Environment) -> tuple[str, str]:
    """The profile for this machine's device, and why."""
    if env.device == "cpu":
        return "cpu", "probe (CPU)"
    if env.device_name is None:
        return ASSUMED_GPU, "assumed, no GPU here to probe (launch.accelerator)"
    name = env.device_name.upper().replace("-", " ")
    for key, tag in (("h800", "H800"), ("h100", "H100"), ("a100", "A100")):
        if tag in name:
            if key == "a100" and env.device_memory_gib is not None and env.device_memory_gib < 60:
                key = "a100_40g"
            return key, f"probe ({env.device_name})"
    raise ConfigError(
        f"launch.accelerator=auto: this machine's GPU ({env.device_name}) has no built-in "
        f"cost profile (known: {', '.join(k for k in PROFILES if k != 'cpu')}). Set "
        "launch.accelerator to the closest one and launch.device_tflops, "
        "launch.intra_node_gbps, launch.inter_node_gbps to this GPU's figures."
    )


def resolve_hardware(run: RunConfig, env: Environment, devices_per_node: int) -> Hardware:
    """The profile named by ``launch.accelerator`` (or detected), overridden by ``launch.*``."""
    lc = run.launch
    if lc.accelerator == "auto":
        key, why = _detected_accelerator(env)
    elif lc.accelerator in PROFILES:
        key, why = lc.accelerator, "launch.accelerator"
    else:
        raise ConfigError(
            f"launch.accelerator={lc.accelerator!r}: choose one of auto, {', '.join(PROFILES)}."
        )
    prof = PROFILES[key]
    if prof.device != env.device:
        raise ConfigError(
            f"launch.accelerator={key} is a {prof.device} profile but the run is on "
            f"{env.device} (device={run.device}). Use launch.accelerator=auto, or "
            f"device={prof.device} to plan for it."
        )
    sources = {"accelerator": why}

    def pick(name: str, setting: float | None, probed: float | None, default: float | None):
        if setting is not None:
            if setting <= 0:
                raise ConfigError(f"launch.{name}={setting}: must be positive.")
            sources[name] = f"launch.{name}"
            return float(setting)
        if probed is not None:
            sources[name] = "probe"
            return float(probed)
        sources[name] = f"profile {key}"
        return default

    half = run.precision.dtype != "float32"
    if half and prof.tflops_16 is None:
        raise ConfigError(
            f"precision={run.precision.name}: the {key} profile computes in float32 only."
        )
    memory = pick("device_memory_gib", lc.device_memory_gib, env.device_memory_gib, prof.memory_gib)
    if memory is None:
        raise ConfigError(
            "parallel=auto: this machine's memory is unknown (the OS did not say). Set "
            "launch.device_memory_gib."
        )
    return Hardware(
        accelerator=key,
        device=prof.device,
        devices_per_node=devices_per_node,
        nnodes=lc.nnodes,
        memory_gib=memory,
        tflops=pick(
            "device_tflops", lc.device_tflops, None, prof.tflops_16 if half else prof.tflops_32
        ),
        mfu=pick("mfu", lc.mfu, None, prof.mfu),
        mfu_calibration=mfu_calibration(prof, key, lc.mfu, sources),
        intra_node_gbps=pick("intra_node_gbps", lc.intra_node_gbps, None, prof.intra_node_gbps),
        inter_node_gbps=pick("inter_node_gbps", lc.inter_node_gbps, None, prof.inter_node_gbps),
        host_gbps=pick("host_gbps", lc.host_gbps, None, prof.host_gbps),
        reserved_gib=prof.reserved_gib,
        sources=sources,
    )


UNCALIBRATED = "uncalibrated"


def mfu_calibration(prof: Profile, key: str, setting: float | None, sources: dict[str, str]) -> str:
    """Where the MFU comes from, also written into ``sources`` (the figures the plan lists
    as assumed): launch.mfu, the profile's calibration, or "uncalibrated"."""
    if setting is not None:
        return "launch.mfu"
    if prof.calibration is None:
        sources["mfu"] = f"profile {key}, {UNCALIBRATED} (assumed, no published step times)"
        return UNCALIBRATED
    sources["mfu"] = f"profile {key}, calibrated: {prof.calibration}"
    return prof.calibration


# --------------------------------------------------------------------------- step time


@dataclass(frozen=True, kw_only=True)
class Shape(Degrees):
    """What the cost model needs of a candidate layout: its degrees and batch split."""

    recompute: float  # share of each decoder layer's forward FLOPs run again in backward
    micro_batch: int
    accumulation: int  # micro-batches per optimizer step on each rank
    seq_len: int
    # Share of each layer's forward collectives repeated by recompute (None: as ``recompute``).
    recompute_collectives: float | None = None

    @property
    def repeated_collectives(self) -> float:
        return self.recompute if self.recompute_collectives is None else self.recompute_collectives


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on the busiest device, by cause."""

    compute: float  # recompute's extra forward included
    bubble: float
    data_comm: float  # data-parallel and sharding collectives
    tensor_comm: float
    pipeline_comm: float
    offload: float

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.bubble
            + self.data_comm
            + self.tensor_comm
            + self.pipeline_comm
            + self.offload
        )

    def to_dict(self) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in asdict(self).items()}, "total": round(self.total, 6)}


def _ring(n: int, nbytes: float, gbps: float, all_reduce: bool = False) -> float:
    """Seconds for a ring all-gather / reduce-scatter (all-reduce: both) over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (2 if all_reduce else 1) * (n - 1) / n * nbytes / (gbps * 1e9)


def _group_gbps(hw: Hardware, stride: int, size: int, nproc_per_node: int) -> float:
    """A group of ``size`` ranks ``stride`` apart stays in one node when it spans at most
    the processes of a node."""
    return hw.intra_node_gbps if stride * size <= nproc_per_node else hw.inter_node_gbps


def step_time(
    run: RunConfig,
    counts: ParamCounts,
    adapter: AdapterPlan,
    shape: Shape,
    hw: Hardware,
) -> StepTime:
    """The estimated seconds of one optimizer step of ``shape`` (see the module docstring)."""
    a = run.model.arch
    h, v, seq = a.hidden_size, a.vocab_size, shape.seq_len
    t, p, s, d = shape.tensor, shape.pipeline, shape.sharding, shape.data
    full = adapter.trains_base
    half = run.precision.amp_level == "O2" and run.precision.dtype != "float32"
    weight_b = 2 if half else 4
    act_b = 4 if run.precision.dtype == "float32" else 2
    train_b = weight_b if full or not adapter.adapter_fp32 else 4

    # FLOPs per token of one decoder layer and of the LM head.
    linear = counts.per_layer - counts.norms_and_biases_per_layer + counts.adapter_per_layer
    layer_fwd = 2 * linear + 4 * seq * h
    head_fwd = 2 * v * h
    layer_wgrad = 2 * (linear if full else counts.adapter_per_layer)
    head_wgrad = head_fwd if full else 0
    stage_layers = math.ceil(a.num_hidden_layers / p)
    per_token = (
        stage_layers * (2 * layer_fwd + layer_wgrad + shape.recompute * layer_fwd)
        + 2 * head_fwd
        + head_wgrad
    ) / t
    tokens = shape.micro_batch * seq
    rate = hw.tflops * 1e12 * hw.mfu
    micro_seconds = tokens * per_token / rate
    compute = shape.accumulation * micro_seconds
    bubble = (p - 1) * micro_seconds

    # Bytes per device (this stage's share, tensor-split).
    split = t * p
    grad_bytes = counts.trainable * train_b / split
    trained_param_bytes = grad_bytes  # updated parameters travel in their own dtype
    quant_b = adapter.quantized_bytes_per_param if counts.quantized else 0.0
    weight_bytes = (
        (counts.total - counts.quantized) * weight_b + counts.quantized * quant_b
    ) / split
    n = shape.nproc_per_node
    sh_bw = _group_gbps(hw, t, s, n)
    dp_bw = _group_gbps(hw, t * s * p, d, n)
    m = shape.accumulation
    data_comm = 0.0
    if shape.sharding_stage == 0:  # validation refuses a sharding degree without a stage
        data_comm += _ring(d, grad_bytes, dp_bw, all_reduce=True)
    else:
        scatters = m if shape.sharding_stage >= 2 else 1
        data_comm += scatters * _ring(s, grad_bytes, sh_bw)
        if shape.sharding_stage == 3:
            gathers = 2 + shape.repeated_collectives
            data_comm += m * gathers * _ring(s, weight_bytes, sh_bw)
        else:
            data_comm += _ring(s, trained_param_bytes, sh_bw)
        data_comm += _ring(d, grad_bytes / s, dp_bw, all_reduce=True)

    offload = 0.0
    if shape.offload and hw.host_gbps:
        offload = (grad_bytes + trained_param_bytes) / s / (hw.host_gbps * 1e9)
        if shape.sharding_stage == 3:
            gathers = 2 + shape.repeated_collectives
            offload += m * gathers * weight_bytes / s / (hw.host_gbps * 1e9)

    tensor_comm = 0.0
    if t > 1:
        act = tokens * h * act_b
        reduces = stage_layers * (4 + 2 * shape.repeated_collectives) + 1  # + the embedding's
        tensor_comm = m * (
            reduces * _ring(t, act, hw.intra_node_gbps, all_reduce=True)
            + _ring(t, tokens * v * act_b, hw.intra_node_gbps)  # gathered logits
        )
    pipeline_comm = 0.0
    if p > 1:
        pp_bw = _group_gbps(hw, t * s, p, n)
        pipeline_comm = m * 2 * tokens * h * act_b / (pp_bw * 1e9)
    return StepTime(compute, bubble, data_comm, tensor_comm, pipeline_comm, offload)
