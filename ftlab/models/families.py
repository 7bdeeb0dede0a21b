"""The model-family table: everything ftlab knows about a family lives in its row.

Validation (which families exist, head rules, what a family supports), the plan (layer
names and shapes, biases), the methods (LoRA targets, prefix tuning's key/value layout)
and model loading (which PaddleNLP classes serve training and pipeline parallelism) all
read this table and never name a family themselves. Adding a family is one row.
No Paddle import here: composition and planning run before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlab.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One model family as PaddleNLP implements it."""

    name: str  # ``model.family``; PaddleNLP's ``model_type``
    # Attribute of the causal LM holding the decoder; its layers are ``<prefix>.layers.N``.
    decoder_prefix: str
    causal_lm_class: str  # PaddleNLP class that trains the family
    pipeline_class: str | None  # PaddleNLP's ``...ForCausalLMPipe``; None: no pipeline model
    attention_linears: tuple[str, ...] = ATTENTION
    mlp_linears: tuple[str, ...] = MLP
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    # ``paddlenlp.peft.prefix`` function that turns a prefix into this family's key/value
    # cache layout; None: prefix tuning is not available.
    prefix_kv_layout: str | None = None
    tensor_parallel: bool = True  # PaddleNLP has column/row-parallel layers for it
    flash_attention: bool = True
    flash_mask: bool = True  # the model accepts ``attn_mask_startend_row_indices``
    # The model's attention builds PaddleNLP's long-sequence strategies (RoPE scaling,
    # ``use_long_sequence_strategies``); PaddleNLP 3.0.0b4's Qwen2 attention does not.
    rope_scaling: bool = True

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attention_linears + self.mlp_linears

    @property
    def all_linear_targets(self) -> tuple[str, ...]:
        """LoRA target patterns for every linear layer (what PaddleNLP's scripts adapt)."""
        return tuple(f".*{name}" for name in self.linears)

    def block_of(self, linear: str) -> str:
        """The sublayer holding ``linear`` inside a decoder layer."""
        return "mlp" if linear in self.mlp_linears else "self_attn"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama",
            decoder_prefix="llama",
            causal_lm_class="LlamaForCausalLM",
            pipeline_class="LlamaForCausalLMPipe",
            prefix_kv_layout="llama_postprocess_past_key_value",
        ),
        Family(
            name="qwen2",
            decoder_prefix="qwen2",
            causal_lm_class="Qwen2ForCausalLM",
            pipeline_class="Qwen2ForCausalLMPipe",
            qkv_bias=True,
            prefix_kv_layout="qwen_postprocess_past_key_value",
            rope_scaling=False,
        ),
    )
}


def family(name: str) -> Family:
    """The row for ``name``; an unknown family is a config error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"model.family={name!r} is not a known family; ftlab knows "
            f"{', '.join(sorted(FAMILIES))}."
        ) from None
