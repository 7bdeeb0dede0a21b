"""Parameter and layer arithmetic from ``model.arch`` alone (no Paddle, no weights).

The plan counts parameters and memory from these numbers, and each method counts what
it adds from the same list of linear layers (``Method.plan``), named as PaddleNLP names
the sublayers so that ``target_modules`` regexes match here exactly as on the live model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlab.config.schema import ModelConfig
from ftlab.errors import ConfigError
from ftlab.models.families import family


@dataclass(frozen=True)
class Linear:
    """One linear layer of the model, as PaddleNLP's ``target_modules`` regexes see it."""

    name: str  # full sublayer name, e.g. ``llama.layers.0.self_attn.q_proj``
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


def kv_dim(model: ModelConfig) -> int:
    """Width of one key (or value) projection: key/value heads x head size."""
    return model.arch.num_key_value_heads * head_dim(model)


def model_linears(model: ModelConfig) -> list[Linear]:
    """Every linear layer of the decoder (and the untied LM head), in PaddleNLP's order."""
    a, fam = model.arch, family(model.family)
    h, i, kv = a.hidden_size, a.intermediate_size, kv_dim(model)
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
        for name in fam.linears:
            fan_in, fan_out = shapes[name]
            path = f"{fam.decoder_prefix}.layers.{layer}.{fam.block_of(name)}.{name}"
            out.append(Linear(path, fan_in, fan_out, layer))
    if not a.tie_word_embeddings:
        out.append(Linear("lm_head", h, a.vocab_size, None))
    return out


@dataclass(frozen=True)
class BaseCounts:
    """Parameters of the base model, by where they sit."""

    total: int
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    per_layer: int  # one decoder layer, norms and biases included
    norms_and_biases_per_layer: int
    final_norm: int


def base_counts(model: ModelConfig) -> BaseCounts:
    a, fam = model.arch, family(model.family)
    h = a.hidden_size
    layer_linears = [x for x in model_linears(model) if x.layer == 0]
    # Two RMSNorm weights per layer, plus the q/k/v biases of families that have them.
    norms_biases = 2 * h + ((h + 2 * kv_dim(model)) if fam.qkv_bias else 0)
    per_layer = sum(x.size for x in layer_linears) + norms_biases
    embedding = a.vocab_size * h
    lm_head = 0 if a.tie_word_embeddings else a.vocab_size * h
    return BaseCounts(
        total=embedding + lm_head + a.num_hidden_layers * per_layer + h,
        embedding=embedding,
        lm_head=lm_head,
        per_layer=per_layer,
        norms_and_biases_per_layer=norms_biases,
        final_norm=h,
    )
