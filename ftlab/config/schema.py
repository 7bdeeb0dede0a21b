"""Typed schemas behind every config group.

Each dataclass is registered in Hydra's ConfigStore (``ftlab/resolve/compose.py``) and every YAML
option starts with ``defaults: [base_<schema>]``, so a misspelled key or a wrong type
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
    """Architecture numbers, known without loading weights (plan mode and validation)."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    vocab_size: int = MISSING
    max_position_embeddings: int = MISSING
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING  # short label used in run-dir names
    # A hub name (``meta-llama/Meta-Llama-3-8B``) or a local directory; ``${asset:NAME}``
    # resolves to a checkpoint shipped inside ftlab.
    name_or_path: str = MISSING
    tokenizer_name_or_path: str | None = None  # defaults to name_or_path
    family: str = "llama"  # a row of the family table (ftlab/models/families.py)
    arch: ModelArch = field(default_factory=ModelArch)
    # Regex patterns on sublayer names (PaddleNLP ``target_modules`` convention).
    lora_target_modules: list[str] = field(default_factory=list)
    # Token used for padding when the tokenizer defines none (named in the run log).
    pad_token: str | None = None
    flash_attention: bool = False


# --------------------------------------------------------------------------- method


@dataclass
class MethodConfig:
    """Fields every method shares. Each method extends this with its own dataclass, in the
    method's own module (``ftlab/methods/<name>.py``), next to everything else about it."""

    name: str = MISSING
    # NEFTune: uniform noise scaled by alpha/sqrt(seq_len*hidden) on input embeddings,
    # training only. 0 disables it.
    neftune_noise_alpha: float = 0.0


# --------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    name: str = MISSING
    # A directory holding train.json / train/*.json (and dev.*), or a single file.
    path: str = MISSING
    train_path: str | None = None  # explicit train file/dir; overrides path
    dev_path: str | None = None  # explicit dev file/dir; overrides path
    format: str = "auto"  # auto | src_tgt | alpaca | messages
    chat_template: str | None = None  # null | tokenizer | <named template>
    src_length: int = 256  # prompt tokens kept (truncated from the left)
    max_length: int = 512  # prompt + target tokens (target truncated from the right)
    overlong: str = "truncate"  # truncate | drop | error
    packing: str = "none"  # none | zero_padding | greedy
    on_bad_record: str = "error"  # error | skip
    streaming: bool = False  # iterate files lazily; requires train.max_steps
    dev_from_train: float | None = None  # carve a dev split of this fraction
    shuffle: bool = True


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
    master: str | None = None  # host:port of the rendezvous master (multi-node)
    ips: str | None = None  # comma-separated node IPs (multi-node)
    # The devices parallel=auto plans for (``ftlab/planning/cost.py`` documents the
    # profiles). Unset numbers come from the accelerator's profile or the device probe.
    accelerator: str = "auto"  # auto (this machine) | a100 | a100_40g | h100 | h800 | cpu
    device_memory_gib: float | None = None  # memory per device (CPU: the machine's RAM)
    device_tflops: float | None = None  # peak dense TFLOP/s per device, run's compute dtype
    mfu: float | None = None  # fraction of that peak a training step sustains
    intra_node_gbps: float | None = None  # collective bus bandwidth per device in a node, GB/s
    inter_node_gbps: float | None = None  # ... across nodes, GB/s per device
    host_gbps: float | None = None  # device <-> host copies (sharding offload), GB/s


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


@dataclass
class EvalSettings:
    # Task metric on dev records carrying an ``entities`` list (the demo task); computed
    # for the base model before training and for the fine-tuned model after.
    demo_metric: bool = True
    max_new_tokens: int = 48
    num_samples: int = 5  # sample generations saved to samples.jsonl
    batch_size: int = 32


# --------------------------------------------------------------------------- run


@dataclass
class RunConfig:
    """The primary config: one option per group, plus trainer and run settings."""

    model: ModelConfig = MISSING
    method: Any = MISSING  # a MethodConfig subclass, chosen by the method group
    data: DataConfig = MISSING
    parallel: ParallelConfig = MISSING
    precision: PrecisionConfig = MISSING
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    mode: str = "train"  # train | plan | export
    device: str = "auto"  # auto | cpu | gpu
    resume: str | None = None  # a run dir to continue from its latest checkpoint
    rerun: str | None = None  # a run dir whose saved config runs again, in a new dir
