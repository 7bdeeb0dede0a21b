"""``ParamCounts``: the parameter counts of a run's model as the plan derives them from
``model.arch`` and the method (``ftlab.planning.plan.count_parameters``). A leaf of its
own so the step-time model (``planning.cost``) reads them without importing the plan,
which imports it."""

from __future__ import annotations

from dataclasses import dataclass, field


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
