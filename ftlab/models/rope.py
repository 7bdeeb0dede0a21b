"""RoPE scaling through PaddleNLP's long-sequence strategies: settings -> model config keys.

``model.rope_scaling.strategy`` names one of PaddleNLP's rotary embeddings in
``paddlenlp.transformers.long_sequence_strategies.embedding_strategies`` and
``model.rope_scaling.factor`` multiplies the model's context: a model pretrained on
``max_position_embeddings`` positions then takes ``max_position_embeddings x factor``
(the *scaled context*, recorded as ``derived.context_length``). The model's attention
builds the strategy from ``long_sequence_init_args`` (PaddleNLP's own switch,
``use_long_sequence_strategies``), so the frequencies are PaddleNLP's:

* ``linear``: positions divided by the factor (position interpolation);
* ``ntk``: the rotary base raised to ``base * factor ** (dim / (dim - 2))``;
* ``dynamic_ntk``: plain RoPE up to the pretrained context, NTK with a factor that grows
  with the sequence beyond it (the table is rebuilt for each longer batch);
* ``yarn``: YaRN's per-frequency interpolation and attention temperature, relative to the
  pretrained context.

The static strategies cache the table for the whole scaled context; ``dynamic_ntk`` caches
the pretrained context and extends it to the batch's length. No Paddle import here:
validation, the plan and export read these tables before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

from ftlab.config.schema import ModelConfig

STRATEGY_TYPE = "embedding_strategies"  # PaddleNLP's module of rotary strategies
# ftlab name -> PaddleNLP class in long_sequence_strategies.embedding_strategies
STRATEGIES: dict[str, str] = {
    "linear": "LinearScalingRotaryEmbedding",
    "ntk": "NTKScalingRotaryEmbedding",
    "dynamic_ntk": "DynamicNTKScalingRotaryEmbedding",
    "yarn": "YaRNScalingRotaryEmbedding",
}
# Strategies whose table covers the whole scaled context up front: a position id anywhere
# below it is valid in any batch (what PoSE's skipped positions need).
STATIC_STRATEGIES = ("linear", "ntk", "yarn")
DEFAULT_ROPE_THETA = 10000.0


def context_length(model: ModelConfig) -> int | None:
    """Positions the model takes: the pretrained context, times the factor when scaled
    (None: no fixed context, as with Bloom's ALiBi)."""
    native = model.arch.max_position_embeddings
    if native is None or model.rope_scaling.strategy is None:
        return native
    return int(native * model.rope_scaling.factor)


def long_sequence_config(model: ModelConfig, rope_theta: float) -> dict[str, Any]:
    """PaddleNLP model-config keys that switch the attention to the chosen strategy.

    ``rope_theta`` is the checkpoint's own rotary base (read from its config when loading).
    Empty when ``model.rope_scaling.strategy`` is null.
    """
    rs = model.rope_scaling
    if rs.strategy is None:
        return {}
    a = model.arch
    native = a.max_position_embeddings
    init_args: dict[str, Any] = {
        "dim": a.hidden_size // a.num_attention_heads,
        # dynamic NTK rescales only beyond this length, so it must be the pretrained
        # context; the static strategies cache the table for the scaled context.
        "max_position_embeddings": native
        if rs.strategy == "dynamic_ntk"
        else context_length(model),
        "base": float(rope_theta),
        "scaling_factor": float(rs.factor),
    }
    if rs.strategy == "yarn":
        init_args["original_max_position_embeddings"] = native
    return {
        "use_long_sequence_strategies": True,
        "long_sequence_strategy_type": STRATEGY_TYPE,
        "long_sequence_strategy_name": STRATEGIES[rs.strategy],
        "rope_scaling_factor": float(rs.factor),
        "long_sequence_init_args": init_args,
    }
