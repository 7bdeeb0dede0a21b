"""Parameter and layer arithmetic from ``model.arch`` alone (no Paddle, no weights).

The family's row (``ftlab.models.families``) describes one decoder layer; this module
expands it over the model's layers and experts. The plan counts parameters and memory
from these numbers, and each method counts what it adds from the same list of linear
layers (``Method.plan``), named as PaddleNLP names the sublayers so that
``target_modules`` regexes match here exactly as on the live model. The tests build a
tiny random model of every family and check both the names and the count exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftlab.config.schema import ModelArch, ModelConfig
from ftlab.errors import ConfigError
from ftlab.models.families import Family, H, LinearSpec, family, moe_layer


@dataclass(frozen=True)
class Linear:
    """One linear layer of the model, as PaddleNLP's ``target_modules`` regexes see it."""

    name: str  # full sublayer name, e.g. ``llama.layers.0.self_attn.q_proj``
    fan_in: int
    fan_out: int
    layer: int | None  # decoder layer index; None outside the decoder layers
    part: str = "attention"  # attention | mlp | expert | shared | router | mtp
    bias: bool = False
    expert: int | None = None  # routed expert index
    tp_split: bool = True  # tensor parallelism splits it (else every rank holds it whole)

    @property
    def size(self) -> int:
        return self.fan_in * self.fan_out


def head_dim(model: ModelConfig) -> int:
    a = model.arch
    if a.head_dim:
        return a.head_dim
    if a.hidden_size % a.num_attention_heads:
        raise ConfigError(
            f"model.arch.hidden_size={a.hidden_size} is not a multiple of "
            f"num_attention_heads={a.num_attention_heads}; fix model.arch."
        )
    return a.hidden_size // a.num_attention_heads


def kv_dim(model: ModelConfig) -> int:
    """Width of one key (or value) projection: key/value heads x head size."""
    return model.arch.num_key_value_heads * head_dim(model)


def _layer_count(a: ModelArch) -> int:
    """Decoder layers PaddleNLP builds: the model's, plus DeepSeek-V3's MTP layers."""
    return a.num_hidden_layers + (a.num_nextn_predict_layers or 0)


def _layer_specs(fam: Family, a: ModelArch, index: int) -> list[tuple[LinearSpec, str, int | None]]:
    """(spec, full path inside the layer, expert index) of every weight matrix of a layer."""
    out: list[tuple[LinearSpec, str, int | None]] = [(s, s.path, None) for s in fam.attention]
    if moe_layer(a, index):
        moe = fam.moe
        if moe is None:
            raise ConfigError(
                f"model.arch.num_experts={a.num_experts}: model.family={fam.name} has no "
                "mixture-of-experts layers in PaddleNLP. Set num_experts to 0 or null."
            )
        out += [(s, s.path, None) for s in moe.router]
        for e in range(a.num_experts):
            out += [(s, f"{moe.block}.experts.{e}.{s.path}", e) for s in moe.expert]
        if moe.shared_path and a.shared_expert_intermediate_size:
            out += [(s, f"{moe.shared_path}.{s.path}", None) for s in moe.shared]
    else:
        out += [(s, s.path, None) for s in fam.mlp]
    return [(s, path, e) for s, path, e in out if s.when(a)]


def model_linears(model: ModelConfig) -> list[Linear]:
    """Every ``nn.Linear`` of the decoder, in layer order, named as PaddleNLP names it."""
    a, fam = model.arch, family(model.family)
    out = []
    for layer in range(_layer_count(a)):
        for spec, path, expert in _layer_specs(fam, a, layer):
            if spec.is_linear:
                out.append(
                    Linear(
                        f"{fam.layers_path}.{layer}.{path}",
                        spec.fan_in(a),
                        spec.fan_out(a),
                        layer,
                        spec.part,
                        spec.has_bias(a),
                        expert,
                        spec.tp_split,
                    )
                )
        if layer >= a.num_hidden_layers:  # DeepSeek-V3's MTP layer: eh_proj joins two states
            out.append(
                Linear(f"{fam.layers_path}.{layer}.eh_proj", 2 * H(a), H(a), layer, "mtp", True)
            )
    return out


def optional_tensors(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors a checkpoint may hold beyond ``model_tensors``, with their shapes: the MoE
    router's score-correction bias when ``model.arch.router_bias`` is off (a Hugging Face
    DeepSeek-V3 checkpoint holds it whatever its config's ``topk_method`` says)."""
    a, fam = model.arch, family(model.family)
    if not fam.moe or not fam.moe.router_bias_path or a.router_bias:
        return {}
    return {
        f"{fam.layers_path}.{layer}.{fam.moe.router_bias_path}": (a.num_experts,)
        for layer in range(_layer_count(a))
        if moe_layer(a, layer)
    }


def model_tensors(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight tensor PaddleNLP's class holds, by name, with the shape ``model.arch``
    implies (PaddleNLP's layout: linears ``[in, out]``): embeddings, norms, linears and
    biases, routers, the head when untied, a stored rotary table. What a converted
    checkpoint is checked against, tensor by tensor."""
    a, fam = model.arch, family(model.family)
    h, base, layers = a.hidden_size, fam.base_prefix, fam.layers_path
    norm_parts = ("weight", "bias") if fam.norm_bias else ("weight",)
    out: dict[str, tuple[int, ...]] = {f"{base}.{fam.embedding_path}.weight": (a.vocab_size, h)}
    if fam.position_embeddings is not None:
        rows = fam.position_embeddings(a)
        out[f"{base}.{fam.position_embeddings_path}.weight"] = (rows, h)
    norms = [fam.final_norm_path] + ([fam.embedding_norm_path] if fam.embedding_norm else [])
    for layer in range(_layer_count(a)):
        for spec, path, _ in _layer_specs(fam, a, layer):
            name = f"{layers}.{layer}.{path}"
            if not spec.is_linear:  # a router matrix: ``path`` is the parameter itself
                out[name] = (spec.fan_in(a), spec.fan_out(a))
                continue
            out[f"{name}.weight"] = (spec.fan_in(a), spec.fan_out(a))
            if spec.has_bias(a):
                out[f"{name}.bias"] = (spec.fan_out(a),)
        for norm in fam.norms:
            if norm.when(a):
                out.update(
                    {f"{layers}.{layer}.{norm.path}.{p}": (norm.width(a),) for p in norm_parts}
                )
        if fam.moe and fam.moe.router_bias_path and a.router_bias and moe_layer(a, layer):
            out[f"{layers}.{layer}.{fam.moe.router_bias_path}"] = (a.num_experts,)
        if layer >= a.num_hidden_layers:  # DeepSeek-V3's MTP layer (see model_linears)
            out[f"{layers}.{layer}.eh_proj.weight"] = (2 * h, h)
            out[f"{layers}.{layer}.eh_proj.bias"] = (h,)
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                out[f"{layers}.{layer}.{norm}.weight"] = (h,)
    for norm in norms:
        out.update({f"{base}.{norm}.{p}": (h,) for p in norm_parts})
    if fam.rotary_table is not None:
        out[f"{base}.{fam.rotary_table[0]}"] = (fam.rotary_table[1](a),)
    if lm_head_untied(model):
        out[fam.head_name] = (a.vocab_size, h) if fam.head_vocab_first else (h, a.vocab_size)
    return out


@dataclass(frozen=True)
class LayerCounts:
    """Parameters of one decoder layer, by how parallelism splits them."""

    index: int
    split: int  # linear weights tensor parallelism splits (attention, dense MLP, shared)
    experts: int  # routed experts (weights + biases): split by expert parallelism
    # norms, biases, routers and unsplit linears: whole on every tensor-parallel rank
    replicated: int
    active_experts: int  # of ``experts``, what one token runs through (top-k)
    moe: bool

    @property
    def total(self) -> int:
        return self.split + self.experts + self.replicated

    @property
    def active(self) -> int:
        return self.split + self.active_experts + self.replicated


def layer_counts(model: ModelConfig) -> list[LayerCounts]:
    a, fam = model.arch, family(model.family)
    norm_factor = 2 if fam.norm_bias else 1
    out = []
    for layer in range(_layer_count(a)):
        split = experts = replicated = 0
        for spec, _, expert in _layer_specs(fam, a, layer):
            weight = spec.fan_in(a) * spec.fan_out(a)
            bias = spec.fan_out(a) if spec.has_bias(a) else 0
            if expert is not None:
                experts += weight + bias
            elif spec.part == "router" or not spec.tp_split:
                replicated += weight + bias
            else:
                split += weight
                replicated += bias
        replicated += norm_factor * sum(n.width(a) for n in fam.norms if n.when(a))
        is_moe = moe_layer(a, layer)
        if is_moe and a.router_bias and fam.moe and fam.moe.router_bias_path:
            replicated += a.num_experts
        if layer >= a.num_hidden_layers:  # MTP: enorm, hnorm, eh_proj (with bias)
            replicated += norm_factor * 2 * H(a) + H(a)
            split += 2 * H(a) * H(a)
        active = experts * (a.num_experts_per_tok or 0) // a.num_experts if is_moe else 0
        out.append(LayerCounts(layer, split, experts, replicated, active, is_moe))
    return out


@dataclass(frozen=True)
class BaseCounts:
    """Parameters of the base model, by where they sit."""

    total: int
    embedding: int  # token (+ position) embeddings and the embedding norm
    lm_head: int  # 0 when tied to the embedding
    layers: tuple[LayerCounts, ...]
    final_norm: int
    active: int  # parameters one token runs through (MoE: top-k experts, not all)
    experts: int  # routed-expert parameters over all layers

    @property
    def per_layer(self) -> int:
        """The largest decoder layer, norms and biases included."""
        return max(x.total for x in self.layers)

    @property
    def norms_and_biases_per_layer(self) -> int:
        return max(self.layers, key=lambda x: x.total).replicated


def lm_head_untied(model: ModelConfig) -> bool:
    """PaddleNLP builds a separate output matrix (untied, or a family that never ties)."""
    return not model.arch.tie_word_embeddings or not family(model.family).ties_embeddings


# base_counts by (family, architecture): parallel=auto evaluates thousands of layouts of
# one model, and each evaluation asked for the same counts again (llama3, full, nothing
# fitting 2 GiB: 23,147 calls, 18 of the plan's 27 s under cProfile).
_COUNTS_CACHE: dict[tuple[str, str], BaseCounts] = {}


def base_counts(model: ModelConfig) -> BaseCounts:
    """The base model's parameters by where they sit (computed once per architecture)."""
    key = (model.family, repr(model.arch))
    counts = _COUNTS_CACHE.get(key)
    if counts is None:
        if len(_COUNTS_CACHE) > 256:  # a long-lived process planning many models
            _COUNTS_CACHE.clear()
        counts = _COUNTS_CACHE[key] = _count_base(model)
    return counts


def _count_base(model: ModelConfig) -> BaseCounts:
    a, fam = model.arch, family(model.family)
    h = a.hidden_size
    norm = (2 if fam.norm_bias else 1) * h
    embedding = a.vocab_size * h
    if fam.position_embeddings is not None:
        embedding += fam.position_embeddings(a) * h
    if fam.embedding_norm:
        embedding += norm
    lm_head = a.vocab_size * h if lm_head_untied(model) else 0
    layers = tuple(layer_counts(model))
    outside = embedding + lm_head + norm
    return BaseCounts(
        total=outside + sum(x.total for x in layers),
        embedding=embedding,
        lm_head=lm_head,
        layers=layers,
        final_norm=norm,
        active=outside + sum(x.active for x in layers),
        experts=sum(x.experts for x in layers),
    )


def ffn_width(model: ModelConfig) -> int:
    """MLP width one token runs through in the widest layer (for the activation estimate)."""
    a, fam = model.arch, family(model.family)
    dense = fam.mlp_width(a) if fam.mlp else 0
    if not a.num_experts:
        return dense
    moe = (a.num_experts_per_tok or 0) * (a.moe_intermediate_size or 0)
    return max(dense if a.dense_layers else 0, moe + (a.shared_expert_intermediate_size or 0))
