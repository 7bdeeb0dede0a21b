"""``Derived``: the values ftlab computes from the settings, recorded with the run.

Validation returns one (layout degrees, global batch, the method's own values such as
LoRA's alpha and scaling); the run adds what it learns from the data and the run dir
(examples, total steps, what a resume started from) by making a new one with ``with_``.
It is frozen: nothing downstream mutates what validation decided. ``to_dict`` is the
``derived:`` section of ``resolved_config.yaml`` and of ``summary.json``: the method's
values (and the stage's) sit beside the others, and unset values are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Derived:
    device: str  # cpu | gpu: what the run computes on
    world_size: int
    nproc_per_node: int
    data_parallel_degree: int
    global_batch_size: int  # micro batch x accumulation x data-parallel and sharding ranks
    # The method's own derived values (``Method.derived``): lora_alpha, quant_backend, ...
    method: Mapping[str, Any] = field(default_factory=dict)
    # The stage's (``Stage.derived``): the reference model, the loss PaddleNLP runs, ...
    stage: Mapping[str, Any] = field(default_factory=dict)
    # Pipeline layouts: micro-batches of this size, this many per optimizer step (1F1B).
    pipeline_micro_batch_size: int | None = None
    pipeline_accumulate_steps: int | None = None
    # Whether BLEU/ROUGE of dev generations run (eval.generation, null resolved).
    eval_generation: bool | None = None
    # A data mixture's normalised weights by source name (data.sources).
    mixture_weights: Mapping[str, float] | None = None
    # parallel=auto: the layout it chose, in words (the whole table: auto_layout.json).
    auto_layout: str | None = None
    # Known once the data is read.
    train_examples: int | None = None
    total_steps: int | None = None
    data_format: str | None = None
    # Long sequences: positions the model takes (RoPE-scaled when set) and the
    # attention path (``ftlab.models.attention.AttentionPath.name``).
    context_length: int | None = None
    attention: str | None = None
    # Resume and rerun.
    resumed_from: str | None = None
    resume_changes: tuple[str, ...] | None = None
    rerun_of: str | None = None
    rerun_differences: tuple[str, ...] | None = None
    # init_from: the run (or adapter dir) started from, and the model loaded as the base.
    init_from: str | None = None
    init_model: str | None = None
    # CPU runs: Paddle's math threads per process, MKL's code path and the eager layers'
    # implementation (launch.cpu_*).
    cpu_threads: int | None = None
    mkl_path: str | None = None
    cpu_layers: str | None = None  # attention, RMSNorm, rotary on CPU (fast path)
    # The metric that ranks checkpoints (train.metric_for_best_model, or loss when the best
    # checkpoint or early stopping needs one) and whether greater is better, as it implies.
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    # Validated against a described machine (plan/export for a GPU target): what was assumed.
    assumptions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", MappingProxyType(dict(self.method)))
        if self.mixture_weights is not None:
            object.__setattr__(
                self, "mixture_weights", MappingProxyType(dict(self.mixture_weights))
            )
        object.__setattr__(self, "stage", MappingProxyType(dict(self.stage)))
        for name in ("resume_changes", "rerun_differences", "assumptions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def with_(self, **changes: Any) -> Derived:
        """A copy with ``changes`` (a run adds what it learns; validation's values stay)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The flat record: every set value, the method's values beside the others."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("method", "stage"):
                out.update(value)
            elif isinstance(value, Mapping):
                out[f.name] = dict(value)
            elif value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def __getitem__(self, key: str) -> Any:
        """Read a value by the key the resolved config records it under."""
        return self.to_dict()[key]
