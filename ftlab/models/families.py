"""The model-family table: everything ftlab knows about a family lives in its row.

Validation (which families exist, head rules, what a family supports), the plan (layer
names and shapes, biases, experts), the methods (LoRA targets, prefix tuning's key/value
layout), the config.json reader (``ftlab.models.config_json``: which keys name which
number) and model loading (which PaddleNLP classes serve training and pipeline
parallelism) all read this table and never name a family themselves. Adding a family is
one row.

A row describes one decoder layer as PaddleNLP 3.0.0b4 builds it: its linear layers
(path inside the layer, fan-in and fan-out as functions of ``model.arch``, bias), its
norms, and for mixture-of-experts models the router, the routed experts and the shared
expert. ``ftlab.models.arch`` turns that into the model's full list of linear layers and
its parameter count, which the tests check against live PaddleNLP models of every family
exactly (``tests/test_families.py``).

No Paddle import here: composition and planning run before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ftlab.config.schema import ModelArch
from ftlab.errors import ConfigError

Dim = Callable[[ModelArch], int]  # a width, from the (resolved) architecture numbers
Flag = Callable[[ModelArch], bool]


# --------------------------------------------------------------------------- dimensions
# Named once, used by the rows below. ``a`` is a resolved ModelArch (head_dim filled in).


def H(a: ModelArch) -> int:  # noqa: N802 - the conventional symbol
    return a.hidden_size


def Q(a: ModelArch) -> int:  # noqa: N802
    return a.num_attention_heads * a.head_dim


def KV(a: ModelArch) -> int:  # noqa: N802
    return a.num_key_value_heads * a.head_dim


def QKV(a: ModelArch) -> int:  # noqa: N802 - fused query/key/value projection
    return Q(a) + 2 * KV(a)


def FFN(a: ModelArch) -> int:  # noqa: N802 - one branch of the dense MLP
    return a.intermediate_size


def FFN2(a: ModelArch) -> int:  # noqa: N802 - gate and up fused in one linear (ChatGLM2)
    return 2 * a.intermediate_size


def FFN_HALF(a: ModelArch) -> int:  # noqa: N802 - Qwen (v1): intermediate_size spans both
    return a.intermediate_size // 2


def EXPERT(a: ModelArch) -> int:  # noqa: N802 - one routed expert's MLP width
    return a.moe_intermediate_size


def SHARED(a: ModelArch) -> int:  # noqa: N802 - the shared expert's MLP width
    return a.shared_expert_intermediate_size or 0


def EXPERTS(a: ModelArch) -> int:  # noqa: N802 - router output: one score per expert
    return a.num_experts


def ONE(a: ModelArch) -> int:  # noqa: N802 - a scalar gate
    return 1


# Multi-head latent attention (DeepSeek-V2/V3).
def MLA_Q(a: ModelArch) -> int:  # noqa: N802 - every head's query (no-RoPE + RoPE part)
    return a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)


def MLA_Q_RANK(a: ModelArch) -> int:  # noqa: N802
    return a.q_lora_rank or 0


def MLA_KV_A(a: ModelArch) -> int:  # noqa: N802 - compressed kv + the shared RoPE key
    return a.kv_lora_rank + a.qk_rope_head_dim


def MLA_KV_RANK(a: ModelArch) -> int:  # noqa: N802
    return a.kv_lora_rank


def MLA_KV_B(a: ModelArch) -> int:  # noqa: N802 - per head: no-RoPE key + value
    return a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim)


def MLA_O(a: ModelArch) -> int:  # noqa: N802
    return a.num_attention_heads * a.v_head_dim


def _always(a: ModelArch) -> bool:
    return True


def _qkv_bias(a: ModelArch) -> bool:
    return bool(a.qkv_bias)


def _q_lora(a: ModelArch) -> bool:
    return bool(a.q_lora_rank)


def _no_q_lora(a: ModelArch) -> bool:
    return not a.q_lora_rank


def _router_bias(a: ModelArch) -> bool:
    return bool(a.router_bias)


# --------------------------------------------------------------------------- layer specs


@dataclass(frozen=True)
class LinearSpec:
    """A weight matrix in one decoder layer (or one expert), as PaddleNLP names it.

    ``path`` is relative to the decoder layer; for routed experts it is relative to one
    expert (``<moe block>.experts.<e>.``). ``part`` says what it is: ``attention``,
    ``mlp`` (a dense layer's MLP), ``expert``, ``shared`` (the shared expert) or
    ``router`` (the expert router and gates: never a LoRA target by default).
    ``is_linear`` is False for weights that are plain parameters, not ``nn.Linear``
    layers (PaddleNLP's Qwen2-MoE / DeepSeek routers): PEFT methods cannot target them.
    """

    path: str
    fan_in: Dim
    fan_out: Dim
    part: str
    bias: Flag | bool = False
    when: Flag = _always  # present only when this holds (DeepSeek: q_proj vs q_a/q_b)
    is_linear: bool = True
    # Tensor parallelism splits it (PaddleNLP's column/row-parallel layer); False: each
    # rank holds it whole (DeepSeek's low-rank down-projections).
    tp_split: bool = True

    def has_bias(self, a: ModelArch) -> bool:
        return self.bias(a) if callable(self.bias) else bool(self.bias)


@dataclass(frozen=True)
class NormSpec:
    """A norm inside a decoder layer: ``width`` weights (+ as many biases for LayerNorm)."""

    path: str
    width: Dim
    when: Flag = _always


@dataclass(frozen=True)
class MoESpec:
    """How a family's mixture-of-experts layers are built (which layers: ``arch.dense_layers``)."""

    block: str  # the sublayer holding router and experts: "mlp", "block_sparse_moe"
    expert: tuple[LinearSpec, ...]  # one routed expert's linears, relative to the expert
    router: tuple[LinearSpec, ...]  # router weight (+ gates), relative to the layer
    shared_path: str | None = None  # the shared expert's sublayer, relative to the layer
    shared: tuple[LinearSpec, ...] = ()  # relative to ``shared_path``
    router_bias_path: str | None = None  # DeepSeek-V3's score-correction bias
    # Tensor parallelism splits the routed experts' linears (else each rank holds them whole).
    tensor_parallel_experts: bool = True
    # PaddleNLP's MoELayer: experts are split across the data-parallel group, which is the
    # installed version's expert parallelism (``use_expert_parallel``).
    expert_parallel: bool = False


def _chatglm2_paddle_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face ChatGLM2/3 config.json as PaddleNLP's ChatGLMv2 class reads it."""
    return {
        "model_type": "chatglm_v2",
        "architectures": ["ChatGLMv2ForCausalLM"],
        "max_sequence_length": cfg.get("seq_length", cfg.get("max_sequence_length", 2048)),
    }


# --------------------------------------------------------------------------- the row


@dataclass(frozen=True)
class Family:
    """One model family as PaddleNLP 3.0.0b4 implements it."""

    name: str  # ``model.family``; PaddleNLP's ``model_type``
    # config.json ``model_type`` values that are this family (Hugging Face and PaddleNLP).
    model_types: tuple[str, ...]
    # PaddleNLP chooses a model class by the name in config.json's ``architectures``;
    # this is the name stem it maps to this family ("Qwen2Moe" in "Qwen2MoeForCausalLM").
    paddlenlp_arch: str
    layers_path: str  # the decoder layers: ``<layers_path>.N``
    causal_lm_class: str  # PaddleNLP class that trains the family
    pipeline_class: str | None  # PaddleNLP's ``...ForCausalLMPipe``; None: no pipeline model
    attention: tuple[LinearSpec, ...]
    mlp: tuple[LinearSpec, ...]  # the dense MLP (every layer of a dense model)
    norms: tuple[NormSpec, ...]
    moe: MoESpec | None = None
    norm_bias: bool = False  # LayerNorm (weight + bias) instead of RMSNorm (weight)
    embedding_norm: bool = False  # a norm right after the embedding (Bloom)
    # Learned absolute positions: rows of the position-embedding table (OPT adds 2).
    position_embeddings: Dim | None = None
    # Tensors outside the decoder layers as PaddleNLP's class names them (relative to
    # ``base_prefix``), so that every tensor of a checkpoint has a shape config.json
    # implies (``ftlab.models.arch.model_tensors``).
    embedding_path: str = "embed_tokens"
    final_norm_path: str = "norm"
    embedding_norm_path: str = "word_embeddings_layernorm"  # with ``embedding_norm``
    position_embeddings_path: str = "embeddings.position_embeddings"  # with the above
    # The untied LM head's full name; PaddleNLP's ``lm_head.decoder_weight`` is
    # [vocab, hidden] where ``lm_head.weight`` is [hidden, vocab].
    head_name: str = "lm_head.weight"
    head_vocab_first: bool = False
    # A rotary table the checkpoint stores as a weight: (name under base_prefix, length).
    rotary_table: tuple[str, Dim] | None = None
    # Hugging Face checkpoints whose names or config PaddleNLP's class does not read as
    # they are (ChatGLM2/3: remote-code names under ``transformer.``, which
    # ``_get_name_mappings`` leaves out; config.json says model_type "chatglm", which
    # PaddleNLP builds as ChatGLM v1): the names' extra prefix, and config.json -> the
    # keys PaddleNLP's config needs (written into the converted copy).
    hf_name_prefix: str = ""
    paddle_config: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # PaddleNLP honours ``tie_word_embeddings``; False: its LM head is always a separate
    # matrix, which a tied checkpoint does not provide (refused in validation).
    ties_embeddings: bool = True
    # PaddleNLP computes the head size as hidden_size / heads, whatever config.json says.
    head_dim_from_config: bool = False
    qkv_bias: bool = False  # default when config.json does not say
    mlp_width: Dim = FFN  # MLP width per token, for the activation estimate (dense layers)
    # ``paddlenlp.peft.prefix`` function that turns a prefix into this family's key/value
    # cache layout; None: prefix tuning is not available.
    prefix_kv_layout: str | None = None
    tensor_parallel: bool = True  # PaddleNLP has column/row-parallel layers for it
    flash_attention: bool = True
    flash_attention_reason: str = ""  # why not, when flash_attention is False
    flash_mask: bool = True  # the model accepts ``attn_mask_startend_row_indices``
    # The model's attention builds PaddleNLP's rotary long-sequence strategies (RoPE
    # scaling, ``use_long_sequence_strategies``) and ftlab has tested them: Llama. (PaddleNLP
    # 3.0.0b4's Qwen2 attention does not build them; Bloom's ALiBi and OPT's learned
    # positions have no rotary table; Qwen and ChatGLM2 build them, untested here.)
    rope_scaling: bool = False
    # What run_finetune.py's ``get_lora_target_modules`` adapts for this family.
    script_lora_targets: tuple[str, ...] = ()
    # Hugging Face in (``ftlab.interop.hf_in``): config.json values transformers' class
    # takes when config.json lacks the key, where PaddleNLP's config class has another
    # default. The converted copy's config.json gets them (keys config.json sets are
    # kept), so PaddleNLP's class builds the model transformers builds.
    hf_config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # ... and values transformers' class hard-codes (its config.json cannot change them):
    # written over whatever config.json says.
    hf_config_fixed: Mapping[str, Any] = field(default_factory=dict)
    # A tied Hugging Face checkpoint of a family whose PaddleNLP class never ties
    # (``ties_embeddings`` False): (embedding, output matrix) as PaddleNLP names them, same
    # layout. The conversion writes the embedding under both names, so the separate head
    # starts equal to the tied one (the function transformers computes). None: a tied
    # checkpoint of such a family is refused in validation.
    tied_head_copy: tuple[str, str] | None = None
    # Hugging Face tokenizers of remote-code checkpoints (Qwen, ChatGLM2/3): the
    # tokenizer_config.json values PaddleNLP's tokenizer class needs to tokenize as the
    # repository's own class does (``ftlab.interop.hf_tokenizer``), written over the file's.
    hf_tokenizer_config: Mapping[str, Any] = field(default_factory=dict)
    # config.json keys for each ``model.arch`` field, first present wins (after the
    # common ones in ``ftlab.models.config_json``); and values when a key is absent.
    config_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Family-specific reading: (config.json dict, arch so far) -> more arch values; raises
    # ConfigError for configs PaddleNLP's class would build differently.
    read_config: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_keys", MappingProxyType(dict(self.config_keys)))
        object.__setattr__(self, "config_defaults", MappingProxyType(dict(self.config_defaults)))
        hf_defaults = MappingProxyType(dict(self.hf_config_defaults))
        object.__setattr__(self, "hf_config_defaults", hf_defaults)
        object.__setattr__(self, "hf_config_fixed", MappingProxyType(dict(self.hf_config_fixed)))
        hf_tok = MappingProxyType(dict(self.hf_tokenizer_config))
        object.__setattr__(self, "hf_tokenizer_config", hf_tok)

    @property
    def base_prefix(self) -> str:
        """PaddleNLP's ``base_model_prefix``: the causal LM's attribute holding the model."""
        return self.layers_path.split(".", 1)[0]

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention (DeepSeek): its low-rank numbers are required."""
        return any(s.path.endswith("kv_b_proj") for s in self.attention)

    def default_targets(self, a: ModelArch) -> list[str]:
        """LoRA targets as PaddleNLP's scripts choose them: every linear layer (experts
        and shared experts included), routers and gates excluded. Explicit regexes, matched
        in full against sublayer names."""
        specs = [s for s in self.attention if s.when(a)]
        if is_moe(a):
            moe = self.moe
            assert moe is not None
            if a.dense_layers:
                specs += self.mlp
            specs += [_prefixed(s, f"{moe.block}.experts.{{e}}") for s in moe.expert]
            if moe.shared_path and SHARED(a):
                specs += [_prefixed(s, moe.shared_path) for s in moe.shared]
        else:
            specs += self.mlp
        out: list[str] = []
        for s in specs:
            if s.is_linear and s.part != "router":
                pattern = target_pattern(s.path)
                if pattern not in out:
                    out.append(pattern)
        return out


def _prefixed(spec: LinearSpec, prefix: str) -> LinearSpec:
    return LinearSpec(
        f"{prefix}.{spec.path}",
        spec.fan_in,
        spec.fan_out,
        spec.part,
        spec.bias,
        spec.when,
        spec.is_linear,
        spec.tp_split,
    )


def target_pattern(path: str) -> str:
    """The regex naming a linear by its path inside a decoder layer (``{e}``: any expert)."""
    return ".*" + path.replace("{e}", r"\d+")


def is_moe(a: ModelArch) -> bool:
    return bool(a.num_experts)


def moe_layer(a: ModelArch, index: int) -> bool:
    """Whether decoder layer ``index`` holds experts (else a dense MLP)."""
    return is_moe(a) and index not in (a.dense_layers or [])


# --------------------------------------------------------------------------- shared specs

LLAMA_ATTENTION = (
    LinearSpec("self_attn.q_proj", H, Q, "attention", _qkv_bias),
    LinearSpec("self_attn.k_proj", H, KV, "attention", _qkv_bias),
    LinearSpec("self_attn.v_proj", H, KV, "attention", _qkv_bias),
    LinearSpec("self_attn.o_proj", Q, H, "attention"),
)
GATED_MLP = (
    LinearSpec("mlp.gate_proj", H, FFN, "mlp"),
    LinearSpec("mlp.up_proj", H, FFN, "mlp"),
    LinearSpec("mlp.down_proj", FFN, H, "mlp"),
)
GATED_EXPERT = (
    LinearSpec("gate_proj", H, EXPERT, "expert"),
    LinearSpec("up_proj", H, EXPERT, "expert"),
    LinearSpec("down_proj", EXPERT, H, "expert"),
)
GATED_SHARED = (
    LinearSpec("gate_proj", H, SHARED, "shared"),
    LinearSpec("up_proj", H, SHARED, "shared"),
    LinearSpec("down_proj", SHARED, H, "shared"),
)
PRE_POST_NORMS = (
    NormSpec("input_layernorm", H),
    NormSpec("post_attention_layernorm", H),
)
LLAMA_SCRIPT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MLA_ATTENTION = (
    LinearSpec("self_attn.q_proj", H, MLA_Q, "attention", when=_no_q_lora),
    LinearSpec("self_attn.q_a_proj", H, MLA_Q_RANK, "attention", when=_q_lora, tp_split=False),
    LinearSpec("self_attn.q_b_proj", MLA_Q_RANK, MLA_Q, "attention", when=_q_lora),
    LinearSpec("self_attn.kv_a_proj_with_mqa", H, MLA_KV_A, "attention", tp_split=False),
    LinearSpec("self_attn.kv_b_proj", MLA_KV_RANK, MLA_KV_B, "attention"),
    LinearSpec("self_attn.o_proj", MLA_O, H, "attention"),
)
MLA_NORMS = (
    *PRE_POST_NORMS,
    NormSpec("self_attn.q_a_layernorm", MLA_Q_RANK, when=_q_lora),
    NormSpec("self_attn.kv_a_layernorm", MLA_KV_RANK),
)
DEEPSEEK_MOE = MoESpec(
    block="mlp",
    expert=GATED_EXPERT,
    router=(LinearSpec("mlp.gate.weight", H, EXPERTS, "router", is_linear=False),),
    shared_path="mlp.shared_experts",
    shared=GATED_SHARED,
    router_bias_path="mlp.gate.e_score_correction_bias",
    tensor_parallel_experts=False,
    expert_parallel=True,
)


# --------------------------------------------------------------------------- config readers


def _read_qwen2_moe(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    # PaddleNLP's Qwen2MoeDecoderLayer puts experts in every layer when num_experts > 0;
    # it ignores decoder_sparse_step and mlp_only_layers, so a checkpoint that uses them
    # would not load into the model PaddleNLP builds.
    if not cfg.get("num_experts"):
        raise ConfigError(
            "config.json has num_experts=0: PaddleNLP 3.0.0b4's dense Qwen2-MoE layers are "
            "sized by moe_intermediate_size, unlike any released checkpoint; use family qwen2."
        )
    sparse_step = cfg.get("decoder_sparse_step", 1)
    dense = list(cfg.get("mlp_only_layers") or [])
    if sparse_step != 1 or dense:
        raise ConfigError(
            f"config.json has decoder_sparse_step={sparse_step}, mlp_only_layers={dense}: "
            "PaddleNLP 3.0.0b4's Qwen2-MoE puts experts in every layer, so this checkpoint "
            "would not load into the model it builds. Use a checkpoint with experts in "
            "every layer."
        )
    return {"dense_layers": []}


def _read_deepseek(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) != "yarn":
        # DeepseekV2Attention adds two axes to the cos/sin of the plain rotary embedding,
        # which already has them: the forward pass fails (measured, PaddleNLP 3.0.0b4).
        raise ConfigError(
            f"config.json has rope_scaling={cfg.get('rope_scaling')}: PaddleNLP 3.0.0b4's "
            "DeepSeek attention runs only with YaRN rope scaling (its plain-RoPE path fails "
            "on a shape mismatch), as the released DeepSeek-V2/V3 configs use."
        )
    experts = cfg.get("n_routed_experts")
    nextn = cfg.get("num_nextn_predict_layers", 0) or 0
    out: dict[str, Any] = {
        "num_experts": experts or 0,
        "router_bias": cfg.get("topk_method") == "noaux_tc",
        "num_nextn_predict_layers": nextn,
    }
    if experts:
        # DeepseekV2DecoderLayer: experts where layer >= first_k_dense_replace and
        # layer % moe_layer_freq == 0 (the MTP layers after the model's follow the rule).
        first, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1)
        layers = arch["num_hidden_layers"] + nextn
        out["dense_layers"] = [i for i in range(layers) if i < first or i % freq]
        out["shared_expert_intermediate_size"] = (cfg.get("n_shared_experts") or 0) * cfg.get(
            "moe_intermediate_size", 0
        )
    return out


# transformers' DeepSeek-V3 router always scores experts with a sigmoid and picks them by
# score + e_score_correction_bias (``noaux_tc``), whatever config.json says; its
# config.json has neither key, and PaddleNLP's config defaults ("softmax", "gready", a typo
# no branch matches) make the gate fail and leave the bias unbuilt (measured). The
# converted copy's config.json gets these (the row's hf_config_fixed).
DEEPSEEK_V3_ROUTING = {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}


def _read_deepseek_v3(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    # A Hugging Face config.json names no topk_method: the router has its bias. (A
    # PaddleNLP-layout config names its own, which PaddleNLP's class follows.)
    return _read_deepseek({"topk_method": DEEPSEEK_V3_ROUTING["topk_method"], **cfg}, arch)


def _read_mixtral(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    # Every expert is an MLP of intermediate_size; no shared expert, no dense layer.
    return {"moe_intermediate_size": arch["intermediate_size"], "dense_layers": []}


def _read_chatglm2(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("rmsnorm", True) is False or cfg.get("add_bias_linear", False):
        raise ConfigError(
            "config.json has rmsnorm=false or add_bias_linear=true: ftlab models the "
            "ChatGLM2/3 layout (RMSNorm, no linear biases besides q/k/v)."
        )
    if cfg.get("multi_query_attention") is False:
        return {"num_key_value_heads": arch["num_attention_heads"]}
    return {}


def _read_opt(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    proj = cfg.get("word_embed_proj_dim", arch["hidden_size"])
    if proj != arch["hidden_size"] or cfg.get("do_layer_norm_before", True) is False:
        raise ConfigError(
            f"config.json has word_embed_proj_dim={proj} (hidden_size "
            f"{arch['hidden_size']}) or do_layer_norm_before=false (OPT-350m's layout): "
            "PaddleNLP 3.0.0b4's OPT head is sized by hidden_size, so this checkpoint "
            "would not load. Use an OPT whose embeddings are hidden_size wide."
        )
    return {}


# Gemma's MLP activation, config.json ``hidden_act`` (what transformers' GemmaMLP applies;
# transformers 4.57 no longer reads ``hidden_activation``) -> whether Paddle's GELU takes
# its tanh approximation (``ftlab.models.compat.fix_gemma_activation`` applies it).
GEMMA_ACTIVATIONS = {"gelu": False, "gelu_pytorch_tanh": True, "gelu_new": True}
# transformers' GemmaConfig default when config.json has no hidden_act (PaddleNLP's: "gelu")
GEMMA_HF_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh"}


def gelu_approximate(hidden_act: str) -> bool:
    """Whether Gemma's ``hidden_act`` is GELU's tanh approximation (else exact GELU)."""
    try:
        return GEMMA_ACTIVATIONS[hidden_act]
    except KeyError:
        raise ConfigError(
            f"config.json has hidden_act={hidden_act!r}: ftlab runs Gemma's MLP with "
            f"{', '.join(GEMMA_ACTIVATIONS)} (GELU, exact or tanh-approximated) only."
        ) from None


def _read_gemma(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    gelu_approximate(cfg.get("hidden_act", GEMMA_HF_DEFAULTS["hidden_act"]))
    if cfg.get("attention_bias"):
        raise ConfigError(
            "config.json has attention_bias=true: PaddleNLP 3.0.0b4's single-device Gemma "
            "builds q/k/v without biases (only its tensor-parallel layers honour the flag), "
            "so this checkpoint would not load."
        )
    return {"qkv_bias": False}


def _read_bloom(cfg: Mapping[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    # Bloom's MLP is 4 x hidden (no key for it); ALiBi positions have no fixed limit.
    if cfg.get("tie_word_embeddings") is False:
        raise ConfigError(
            "config.json has tie_word_embeddings=false: PaddleNLP 3.0.0b4's Bloom always "
            "uses the embedding as its output layer, so an untied head would not load."
        )
    return {"intermediate_size": 4 * arch["hidden_size"]}


# run_finetune.py's LoRA targets for DeepSeek-V2 and -V3 (its get_lora_target_modules).
DEEPSEEK_SCRIPT_TARGETS = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# --------------------------------------------------------------------------- the table

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama",
            model_types=("llama",),
            paddlenlp_arch="Llama",
            layers_path="llama.layers",
            causal_lm_class="LlamaForCausalLM",
            pipeline_class="LlamaForCausalLMPipe",
            attention=LLAMA_ATTENTION,
            mlp=GATED_MLP,
            norms=PRE_POST_NORMS,
            prefix_kv_layout="llama_postprocess_past_key_value",
            script_lora_targets=LLAMA_SCRIPT_TARGETS,
            config_defaults={"tie_word_embeddings": False},
            rope_scaling=True,
        ),
        Family(
            name="qwen",
            model_types=("qwen",),
            paddlenlp_arch="QWen",
            layers_path="qwen.h",
            causal_lm_class="QWenForCausalLM",
            pipeline_class="QWenForCausalLMPipe",
            attention=(
                LinearSpec("attn.c_attn", H, QKV, "attention", True),
                # nn.Linear(hidden_size, projection_size) in PaddleNLP (equal in practice)
                LinearSpec("attn.c_proj", H, Q, "attention"),
            ),
            mlp=(
                LinearSpec("mlp.w1", H, FFN_HALF, "mlp"),
                LinearSpec("mlp.w2", H, FFN_HALF, "mlp"),
                LinearSpec("mlp.c_proj", FFN_HALF, H, "mlp"),
            ),
            norms=(NormSpec("ln_1", H), NormSpec("ln_2", H)),
            embedding_path="wte",
            final_norm_path="ln_f",
            ties_embeddings=False,
            head_dim_from_config=True,
            qkv_bias=True,
            mlp_width=FFN_HALF,
            prefix_kv_layout="qwen_postprocess_past_key_value",
            flash_mask=False,
            script_lora_targets=("c_attn", "c_proj", "w1", "w2"),
            config_keys={"head_dim": ("kv_channels",)},
            config_defaults={"tie_word_embeddings": False},
            # tokenization_qwen.py ends a text with tiktoken's end-of-text token (its
            # ``eod_id``; the model's generation_config eos); PaddleNLP's QWenTokenizer
            # defines no eos of its own.
            hf_tokenizer_config={"eos_token": "<|endoftext|>"},
        ),
        Family(
            name="qwen2",
            model_types=("qwen2",),
            paddlenlp_arch="Qwen2",
            layers_path="qwen2.layers",
            causal_lm_class="Qwen2ForCausalLM",
            pipeline_class="Qwen2ForCausalLMPipe",
            attention=LLAMA_ATTENTION,
            mlp=GATED_MLP,
            norms=PRE_POST_NORMS,
            qkv_bias=True,
            prefix_kv_layout="qwen_postprocess_past_key_value",
            script_lora_targets=LLAMA_SCRIPT_TARGETS,
            config_defaults={"tie_word_embeddings": False},
        ),
        Family(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            paddlenlp_arch="Qwen2Moe",
            layers_path="qwen2_moe.layers",
            causal_lm_class="Qwen2MoeForCausalLM",
            pipeline_class="Qwen2MoeForCausalLMPipe",
            attention=LLAMA_ATTENTION,
            mlp=GATED_MLP,
            norms=PRE_POST_NORMS,
            moe=MoESpec(
                block="mlp",
                expert=GATED_EXPERT,
                router=(
                    LinearSpec("mlp.gate.weight", H, EXPERTS, "router", is_linear=False),
                    LinearSpec("mlp.shared_expert_gate", H, ONE, "router"),
                ),
                shared_path="mlp.shared_expert",
                shared=GATED_SHARED,
                expert_parallel=True,
            ),
            ties_embeddings=False,
            qkv_bias=True,
            prefix_kv_layout=None,
            script_lora_targets=LLAMA_SCRIPT_TARGETS,
            config_keys={"num_experts": ("num_experts",)},
            config_defaults={"tie_word_embeddings": False},
            read_config=_read_qwen2_moe,
        ),
        Family(
            name="mistral",
            model_types=("mistral",),
            paddlenlp_arch="Mistral",
            layers_path="mistral.layers",
            causal_lm_class="MistralForCausalLM",
            pipeline_class=None,
            attention=LLAMA_ATTENTION,
            mlp=GATED_MLP,
            norms=PRE_POST_NORMS,
            ties_embeddings=False,
            prefix_kv_layout="mistral_postprocess_past_key_value",
            flash_mask=False,
            # get_lora_target_modules lists gate/w1/w2/w3 for mistral, names its layers
            # do not have: the script adapts q, k, v, o and gate_proj only.
            script_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"),
            config_defaults={"tie_word_embeddings": False},
        ),
        Family(
            name="mixtral",
            model_types=("mixtral",),
            paddlenlp_arch="Mixtral",
            layers_path="mixtral.layers",
            causal_lm_class="MixtralForCausalLM",
            pipeline_class=None,
            attention=LLAMA_ATTENTION,
            mlp=(),
            norms=PRE_POST_NORMS,
            moe=MoESpec(
                block="block_sparse_moe",
                expert=(
                    LinearSpec("w1", H, EXPERT, "expert"),
                    LinearSpec("w2", EXPERT, H, "expert"),
                    LinearSpec("w3", H, EXPERT, "expert"),
                ),
                router=(LinearSpec("block_sparse_moe.gate", H, EXPERTS, "router"),),
            ),
            ties_embeddings=False,
            prefix_kv_layout=None,
            flash_mask=False,
            script_lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"),
            config_keys={"num_experts": ("num_local_experts",)},
            config_defaults={"tie_word_embeddings": False},
            read_config=_read_mixtral,
        ),
        Family(
            name="gemma",
            model_types=("gemma",),
            paddlenlp_arch="Gemma",
            layers_path="gemma.layers",
            causal_lm_class="GemmaForCausalLM",
            pipeline_class="GemmaForCausalLMPipe",
            attention=LLAMA_ATTENTION,
            mlp=GATED_MLP,
            norms=PRE_POST_NORMS,
            head_dim_from_config=True,
            prefix_kv_layout=None,
            flash_mask=False,
            # get_lora_target_modules has no entry for gemma: run_finetune.py's LoRA fails.
            script_lora_targets=(),
            config_defaults={"tie_word_embeddings": True},
            read_config=_read_gemma,
            hf_config_defaults=GEMMA_HF_DEFAULTS,
        ),
        Family(
            name="chatglm_v2",
            model_types=("chatglm_v2",),
            paddlenlp_arch="ChatGLMv2",
            layers_path="chatglm_v2.encoder.layers",
            causal_lm_class="ChatGLMv2ForCausalLM",
            pipeline_class="ChatGLMv2ForCausalLMPipe",
            attention=(
                LinearSpec("self_attention.query_key_value", H, QKV, "attention", _qkv_bias),
                LinearSpec("self_attention.dense", Q, H, "attention"),
            ),
            mlp=(
                LinearSpec("mlp.dense_h_to_4h", H, FFN2, "mlp"),
                LinearSpec("mlp.dense_4h_to_h", FFN, H, "mlp"),
            ),
            norms=PRE_POST_NORMS,
            embedding_path="embedding.word_embeddings",
            final_norm_path="encoder.final_layernorm",
            head_name="chatglm_v2.output_layer.weight",
            # RotaryEmbedding(kv_channels // 2): inv_freq has kv_channels // 4 entries
            rotary_table=("rotary_pos_emb.inv_freq", lambda a: (a.head_dim or 0) // 4),
            hf_name_prefix="transformer.",
            paddle_config=_chatglm2_paddle_config,
            # The repository's tokenizer_config.json names its own "ChatGLMTokenizer",
            # which PaddleNLP maps to ChatGLM v1's; v2's class reads the same tokenizer.model
            # and adds the same [gMASK] sop prefix (ids after the sentencepiece pieces).
            # Its default encode_special_tokens=True would also cut "sop", "eop", "</s>"
            # out of plain text ("Aesop" -> "Ae" sop); chatglm2-6b's class never does, nor
            # does ChatGLM3's by default.
            hf_tokenizer_config={
                "tokenizer_class": "ChatGLMv2Tokenizer",
                "encode_special_tokens": False,
            },
            ties_embeddings=False,
            head_dim_from_config=True,
            qkv_bias=False,
            prefix_kv_layout="chatglm_postprocess_past_key_value",
            flash_attention=False,
            flash_attention_reason="its flash path reshapes the [batch, seq] attention output "
            "as [seq, batch]: logits differ from the eager path by 2.2 on a tiny model "
            "(measured, batch 2)",
            flash_mask=False,
            script_lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            config_keys={
                "head_dim": ("kv_channels",),
                "num_key_value_heads": ("multi_query_group_num",),
                "qkv_bias": ("add_qkv_bias",),
                "intermediate_size": ("ffn_hidden_size",),
                "max_position_embeddings": ("seq_length", "max_sequence_length"),
                "vocab_size": ("padded_vocab_size", "vocab_size"),
            },
            config_defaults={"tie_word_embeddings": False},
            read_config=_read_chatglm2,
        ),
        # Hugging Face in needs no fix: PaddleNLP's attention applies DeepSeek's YaRN softmax
        # factor (mscale_all_dim), which transformers 4.57's DeepseekV2 leaves out (0.79 on
        # the fixture; 1.7e-6 with the factor: tests/fixtures/hf/live_client.py).
        Family(
            name="deepseek_v2",
            model_types=("deepseek_v2",),
            paddlenlp_arch="DeepseekV2",
            layers_path="deepseek_v2.layers",
            causal_lm_class="DeepseekV2ForCausalLM",
            pipeline_class="DeepseekV2ForCausalLMPipe",
            attention=MLA_ATTENTION,
            mlp=GATED_MLP,
            norms=MLA_NORMS,
            moe=DEEPSEEK_MOE,
            ties_embeddings=False,
            prefix_kv_layout=None,
            script_lora_targets=DEEPSEEK_SCRIPT_TARGETS,
            config_keys={"num_experts": ("n_routed_experts",)},
            config_defaults={"tie_word_embeddings": False},
            read_config=_read_deepseek,
        ),
        Family(
            name="deepseek_v3",
            model_types=("deepseek_v3",),
            paddlenlp_arch="DeepseekV3",
            layers_path="deepseek_v3.layers",
            causal_lm_class="DeepseekV3ForCausalLM",
            pipeline_class="DeepseekV3ForCausalLMPipe",
            attention=MLA_ATTENTION,
            mlp=GATED_MLP,
            norms=MLA_NORMS,
            moe=DEEPSEEK_MOE,
            ties_embeddings=False,
            prefix_kv_layout=None,
            flash_mask=False,
            script_lora_targets=DEEPSEEK_SCRIPT_TARGETS,
            config_keys={"num_experts": ("n_routed_experts",)},
            config_defaults={"tie_word_embeddings": False},
            read_config=_read_deepseek_v3,
            hf_config_fixed=DEEPSEEK_V3_ROUTING,
        ),
        Family(
            name="bloom",
            model_types=("bloom",),
            paddlenlp_arch="Bloom",
            layers_path="bloom.h",
            causal_lm_class="BloomForCausalLM",
            pipeline_class=None,
            attention=(
                LinearSpec("self_attention.query_key_value", H, QKV, "attention", True),
                LinearSpec("self_attention.dense", H, H, "attention", True),
            ),
            mlp=(
                LinearSpec("mlp.dense_h_to_4h", H, FFN, "mlp", True),
                LinearSpec("mlp.dense_4h_to_h", FFN, H, "mlp", True),
            ),
            norms=PRE_POST_NORMS,
            norm_bias=True,
            embedding_norm=True,
            embedding_path="word_embeddings",
            final_norm_path="ln_f",
            head_name="lm_head.decoder_weight",
            head_vocab_first=True,
            qkv_bias=True,
            prefix_kv_layout="bloom_postprocess_past_key_value",
            flash_mask=False,
            script_lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            config_keys={"max_position_embeddings": ("seq_length",)},
            config_defaults={"tie_word_embeddings": True, "max_position_embeddings": None},
            read_config=_read_bloom,
        ),
        Family(
            name="opt",
            model_types=("opt",),
            paddlenlp_arch="OPT",
            layers_path="opt.decoder.layers",
            causal_lm_class="OPTForCausalLM",
            pipeline_class=None,
            attention=(
                LinearSpec("self_attn.q_proj", H, H, "attention", True),
                LinearSpec("self_attn.k_proj", H, H, "attention", True),
                LinearSpec("self_attn.v_proj", H, H, "attention", True),
                LinearSpec("self_attn.out_proj", H, H, "attention", True),
            ),
            mlp=(
                LinearSpec("linear1", H, FFN, "mlp", True),
                LinearSpec("linear2", FFN, H, "mlp", True),
            ),
            norms=(NormSpec("norm1", H), NormSpec("norm2", H)),
            norm_bias=True,
            position_embeddings=lambda a: a.max_position_embeddings + 2,
            embedding_path="embeddings.word_embeddings",
            final_norm_path="decoder.final_layer_norm",
            head_name="lm_head.decoder_weight",
            head_vocab_first=True,
            ties_embeddings=False,
            qkv_bias=True,
            prefix_kv_layout=None,
            flash_attention=False,
            flash_attention_reason="PaddleNLP's OPT has no flash-attention path (the setting "
            "is ignored)",
            flash_mask=False,
            script_lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "linear1", "linear2"),
            config_keys={"intermediate_size": ("ffn_dim",)},
            config_defaults={"tie_word_embeddings": True},
            read_config=_read_opt,
            # transformers' OPT ties its head (config.json has no tie_word_embeddings: the
            # default, true); PaddleNLP's OPTLMHead is always its own matrix.
            tied_head_copy=("opt.embeddings.word_embeddings.weight", "lm_head.decoder_weight"),
        ),
    )
}

# model_type values PaddleNLP 3.0.0b4 has causal-LM classes for that ftlab does not model,
# with the reason; the config.json reader names them instead of "unknown".
NOT_MODELLED: dict[str, str] = {
    "chatglm": "ChatGLM-6B (v1) in PaddleNLP is the legacy GLM layout with 2-D positions; "
    "ftlab models ChatGLM2/3 (family chatglm_v2)",
    "gpt": "PaddleNLP's own GPT-3 implementation (not Hugging Face's gpt2), not modelled by ftlab",
    "yuan": "Yuan 2.0 reads tokenizer fields (eod_token, sep_token, use_loss_mask) from "
    "its config and is not modelled by ftlab",
    "jamba": "a hybrid Mamba/attention MoE that run_finetune.py's LoRA target list does "
    "not cover; not modelled by ftlab",
    "mamba": "a state-space model without attention: no LoRA targets in run_finetune.py, "
    "no prefix layout; not modelled by ftlab",
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
