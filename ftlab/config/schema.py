"""Typed schemas behind every config group.

Each dataclass is registered in Hydra's ConfigStore (``ftlab/resolve/compose.py``) and every YAML
option starts with ``defaults: [/base_<schema>@_here_]``, so a misspelled key or a wrong type
fails at composition time, before anything heavy is imported or loaded.

Fields carry a one-line docstring-comment; that text is what ``ftlab --help`` users and
readers of the resolved config rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# --------------------------------------------------------------------------- model


@dataclass
class ModelArch:
    """Architecture numbers, known without loading weights (plan mode and validation).

    Every field may stay unset (null) in a model option whose ``name_or_path`` is a local
    directory: composition reads it from the directory's ``config.json`` (PaddleNLP or
    Hugging Face naming) and records it here. A value set in YAML (or an override) that
    contradicts ``config.json`` is refused, naming both. Hub names carry all numbers in
    their YAML (from the public config of the checkpoint), so plan and export work offline.
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None  # dense MLP width (MoE models: their dense layers)
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    # Context length; null for ALiBi families (no fixed limit).
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None
    head_dim: int | None = None  # null -> hidden_size / num_attention_heads
    qkv_bias: bool | None = None  # q/k/v projections carry a bias (null -> the family's)
    # Mixture of experts (num_experts null or 0: a dense model).
    num_experts: int | None = None  # routed experts per MoE layer
    num_experts_per_tok: int | None = None  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # width of one routed expert's MLP
    shared_expert_intermediate_size: int | None = None  # width of the shared expert(s)
    dense_layers: list[int] | None = None  # decoder layers with a dense MLP (MoE models)
    router_bias: bool | None = None  # the router carries a score-correction bias (DeepSeek-V3)
    # Multi-head latent attention (DeepSeek-V2/V3); q_lora_rank null: a plain q_proj.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    num_nextn_predict_layers: int | None = None  # DeepSeek-V3's multi-token-prediction layers


@dataclass
class RopeScalingConfig:
    """RoPE scaling through PaddleNLP's long-sequence strategies (``ftlab/models/rope.py``)."""

    # null (the model's own RoPE) | linear | ntk | dynamic_ntk | yarn
    strategy: str | None = None
    # Context multiplier: the model then takes max_position_embeddings x factor positions.
    factor: float = 1.0


@dataclass
class ModelConfig:
    name: str | None = None  # label used in run-dir names; null -> last part of name_or_path
    # A hub name (``meta-llama/Meta-Llama-3-8B``) or a local directory; ``${asset:NAME}``
    # resolves to a checkpoint shipped inside ftlab. A local directory's config.json gives
    # the family and model.arch (recorded in the resolved config).
    name_or_path: str = MISSING
    tokenizer_name_or_path: str | None = None  # defaults to name_or_path
    family: str | None = None  # a row of ftlab/models/families.py; null -> config.json
    arch: ModelArch = field(default_factory=ModelArch)
    # Regex patterns on sublayer names (PaddleNLP ``target_modules`` convention); null ->
    # the family's default (every linear layer except MoE routers), recorded when resolved.
    lora_target_modules: list[str] | None = None
    # Token used for padding when the tokenizer defines none (named in the run log; it
    # must be in the tokenizer's vocabulary).
    pad_token: str | None = None
    flash_attention: bool = False
    # Pickled weights (``*.pdparams``, ``pytorch_model.bin``) can run code when read. ftlab
    # reads safetensors only, and reads a pickle only when this is set explicitly.
    allow_pickle: bool = False
    # --- long sequences ---
    # Packed batches carry FlashMask's attn_mask_startend_row_indices ([B, 1, L] int32)
    # instead of a dense [B, L, L] mask; needs flash_attention and packing.
    flash_mask: bool = False
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)


# --------------------------------------------------------------------------- method


@dataclass
class MethodConfig:
    """Fields every method shares. Each method extends this with its own dataclass, in the
    method's own module (``ftlab/methods/<name>.py``), next to everything else about it."""

    name: str = MISSING
    # NEFTune: uniform noise scaled by alpha/sqrt(seq_len*hidden) on input embeddings,
    # training only. 0 disables it.
    neftune_noise_alpha: float = 0.0


# --------------------------------------------------------------------------- stage


@dataclass
class StageConfig:
    """Fields every training stage shares (``sft``, ``dpo``, ``kto``). Each stage extends
    this with its own dataclass, in its module (``ftlab/stages/<name>.py``)."""

    name: str = MISSING


# --------------------------------------------------------------------------- data


@dataclass
class DataSource:
    """One dataset of a weighted mixture (``data.sources``)."""

    path: str = MISSING  # a directory with train.json (and dev.json), or a train file
    weight: float = 1.0  # relative share of the mixture's examples (normalised)
    name: str | None = None  # label in the summary and eval logs; default: last path part
    format: str = "auto"  # auto | src_tgt | alpaca | messages, detected per source
    chat_template: str | None = None  # null: data.chat_template; "none": plain
    on_bad_record: str | None = None  # null: data.on_bad_record


@dataclass
class DataConfig:
    name: str = MISSING
    # A directory holding train.json / train/*.json (and dev.*), or a single file; null
    # when ``sources`` names a weighted mixture instead.
    path: str | None = MISSING
    train_path: str | None = None  # explicit train file/dir; overrides path
    dev_path: str | None = None  # explicit dev file/dir; overrides path
    # auto | src_tgt | alpaca | messages | text | autoregressive; preference stages:
    # src_response | prompt_chosen_rejected | chosen_rejected | prompt_completion_label
    format: str = "auto"
    chat_template: str | None = None  # null | tokenizer | <named template>
    src_length: int = 256  # prompt tokens kept (truncated from the left)
    max_length: int = 512  # prompt + target tokens (target truncated from the right)
    overlong: str = "truncate"  # truncate | drop | error
    packing: str = "none"  # none | zero_padding | greedy
    on_bad_record: str = "error"  # error | skip
    streaming: bool = False  # iterate files lazily; requires train.max_steps
    dev_from_train: float | None = None  # carve a dev split of this fraction
    shuffle: bool = True
    # --- generation metric and weighted mixtures ---
    # The task is scored by generation (BLEU/ROUGE); eval.generation=null follows this.
    generation_metric: bool = False
    # A weighted mixture of datasets (``data.path`` null): each source keeps its own
    # format detection, chat template and bad-record policy (ftlab/data/mixture.py).
    sources: list[DataSource] = field(default_factory=list)

    # --- long sequences ---
    # PoSE: position ids skip ahead inside each training sequence, so examples of
    # max_length tokens cover positions up to the model's (scaled) context.
    pose: bool = False


# --------------------------------------------------------------------------- parallel


@dataclass
class AutoLayoutSettings:
    """``parallel=auto``: how ftlab chooses the layout (``ftlab/planning/auto.py``)."""

    # Samples per optimizer step, split into micro-batch x accumulation x data ranks by
    # the chosen layout. None -> train.per_device_train_batch_size x
    # train.gradient_accumulation_steps (what one process trains on per step).
    global_batch_size: int | None = None
    # Fraction of device memory kept free beyond the plan's estimate (allocator
    # fragmentation, the plan's own error: within 25% of measured peaks on CPU).
    memory_margin: float = 0.10
    recompute: str = "choose"  # choose (off and on) | off | on
    show: int = 5  # ranked candidates printed (plan.json and auto_layout.json hold all)


@dataclass
class ParallelConfig:
    name: str = MISSING
    # Degrees. data=None means "derive from world size" (recorded in the resolved config).
    data: int | None = None
    tensor: int = 1
    pipeline: int = 1
    sharding: int = 1  # sharding degree
    sharding_stage: int = 0  # 0 (off) | 1 | 2 | 3
    # Expert parallelism (mixture-of-experts models): PaddleNLP 3.0.0b4 splits the routed
    # experts across the data-parallel group, so this equals the data-parallel degree.
    expert: int = 1
    sequence_parallel: bool = False
    offload: bool = False  # sharding offload of optimizer states
    # Processes per node; None -> product of degrees on one node.
    nproc_per_node: int | None = None
    # Run tensor/pipeline layouts on CPU with gloo through ftlab's emulation shims.
    cpu_emulation: bool = False
    # Only with parallel=auto (conf/parallel/auto.yaml): how the layout is chosen.
    auto: AutoLayoutSettings = field(default_factory=AutoLayoutSettings)


@dataclass
class LaunchConfig:
    nnodes: int = 1
    # host:port of the rendezvous master (multi-node); slurm[:PORT]: the SLURM job's first node
    master: str | None = None
    ips: str | None = None  # comma-separated node IPs (multi-node)
    # Seconds a node waits for every node to join (launch.master's rendezvous, then the
    # workers' config check) before it fails naming the master: Paddle's launcher would
    # wait forever. Nodes of a cluster job start within seconds to minutes of each other.
    rendezvous_timeout: float = 300.0
    # The devices parallel=auto plans for (``ftlab/planning/cost.py`` documents the
    # profiles). Unset numbers come from the accelerator's profile or the device probe.
    accelerator: str = "auto"  # auto (this machine) | a100 | a100_40g | h100 | h800 | cpu
    device_memory_gib: float | None = None  # memory per device (CPU: the machine's RAM)
    device_tflops: float | None = None  # peak dense TFLOP/s per device, run's compute dtype
    mfu: float | None = None  # fraction of that peak a training step sustains
    intra_node_gbps: float | None = None  # collective bus bandwidth per device in a node, GB/s
    inter_node_gbps: float | None = None  # ... across nodes, GB/s per device
    host_gbps: float | None = None  # device <-> host copies (sharding offload), GB/s
    # CPU runs (ftlab/config/cpu_runtime.py): MKL's AVX2 kernels on an AMD CPU with AVX2
    # (MKL_DEBUG_CPU_TYPE=5, unless the environment sets it), and Paddle's math threads per
    # process: auto -> the cores this process may use / processes per node.
    cpu_fast_path: bool = True
    cpu_threads: str = "auto"
    # Disk free for the run's checkpoints and final/ (GiB); None: probed on this machine
    # (the free space where outputs/ lives), unknown for a described target.
    disk_gib: float | None = None


# --------------------------------------------------------------------------- precision


@dataclass
class PrecisionConfig:
    name: str = MISSING
    dtype: str = "float32"  # float32 | bfloat16 | float16 (compute dtype)
    amp_level: str = "O0"  # O0 (off) | O1 | O2


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainSettings:
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    learning_rate: float = 1e-2
    lr_scheduler_type: str = "cosine"  # linear | cosine | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0 -> evaluate only at the end
    save_steps: int = 0  # 0 -> checkpoint only at the end
    save_total_limit: int = 2
    recompute: bool = False
    dataloader_num_workers: int = 0
    # --- optimizer, recompute detail, trackers; PaddleNLP's names and values
    optim: str = "adamw"  # adamw | adamw_mini | adamw_custom | adamw_16bit_moment
    offload_optim: bool = False  # optimizer states in host memory between steps (GPU)
    recompute_granularity: str = "full"  # full | full_attn | core_attn (train.recompute)
    # Keep chosen ops' outputs instead of recomputing them, "op:skip_num,...", e.g.
    # "flash_attn:-1" (-1: every layer, 0: none, k: the first k layers).
    refined_recompute: str = ""
    no_recompute_layers: list[int] | None = None  # decoder layers never recomputed
    # visualdl, tensorboard, wandb, mlflow
    report_to: list[str] = field(default_factory=lambda: ["visualdl"])
    # --- the best checkpoint and early stopping (docs/tracking.md); PaddleNLP's names
    # The eval metric that ranks checkpoints: loss | ppl (eval_ prefix optional); null: off
    # (loss when load_best_model_at_end is set).
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None  # null: what the metric implies (derived)
    load_best_model_at_end: bool = False  # final/ = the best checkpoint's weights
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: off
    early_stopping_threshold: float = 0.0  # how much the metric must improve to count
    # PaddleNLP's unified-checkpoint options (multi-process runs; docs/tracking.md):
    # async_save | skip_save_model_weight | remove_master_weight
    unified_checkpoint_config: list[str] = field(default_factory=list)
    ckpt_quant_stage: str = "O0"  # O0 off | O1 int8 | O2 int4 optimizer moments in checkpoints


@dataclass
class EvalSettings:
    # Task metric on dev records carrying an ``entities`` list (the demo task); computed
    # for the base model before training and for the fine-tuned model after.
    demo_metric: bool = True
    max_new_tokens: int = 48
    num_samples: int = 5  # sample generations saved to samples.jsonl
    batch_size: int = 32
    # --- generation metrics: BLEU-4 and ROUGE-1/2/L of the dev generations
    # (PaddleNLP's eval_with_do_generation), base and fine-tuned; null: data.generation_metric
    generation: bool | None = None
    decode_strategy: str = "greedy"  # greedy | sampling
    top_k: int = 0  # sampling only; 0: off
    top_p: float = 1.0  # sampling only; 1.0: off
    temperature: float = 1.0  # sampling only
    # How BLEU/ROUGE split text: char (every character, as PaddleNLP scores AdvertiseGen),
    # word (whitespace), auto (char when the references hold CJK characters, else word).
    metric_tokens: str = "auto"


@dataclass
class TargetConfig:
    """The GPU machine ``mode=plan`` / ``mode=export`` with ``device=gpu`` prepare a run for.

    Described, not probed: validation answers for it on any machine, and the plan and the
    export list these values as what they assumed.
    """

    gpus_per_node: int | None = None  # None -> what the parallel layout needs per node
    compute_capability: str = "8.0"  # 7.0 V100, 8.0 A100, 8.9 L40S, 9.0 H100
    paddleslim_ops: bool = True  # PaddleSlim's CUDA ops installed (PaddleNLP's nf4/fp4)


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """The primary config: one option per group, plus trainer and run settings."""

    model: ModelConfig = MISSING
    method: Any = MISSING  # a MethodConfig subclass, chosen by the method group
    stage: Any = MISSING  # a StageConfig subclass, chosen by the stage group (sft, dpo, kto)
    data: DataConfig = MISSING
    parallel: ParallelConfig = MISSING
    precision: PrecisionConfig = MISSING
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    mode: str = "train"  # train | plan | export
    device: str = "auto"  # auto | cpu | gpu
    resume: str | None = None  # a run dir to continue from its latest checkpoint
    rerun: str | None = None  # a run dir whose saved config runs again, in a new dir
    # Start from a finished run (its adapter merged into the base, or its full model), or
    # from a saved adapter directory: e.g. DPO from an SFT run. Recorded in the run dir.
    init_from: str | None = None
    verbose: bool = False  # also print PaddleNLP's and Paddle's log (always in train.log)
