"""Load a base model and tokenizer by hub name or local path, with one-line errors.

Also the one dtype rule (which dtype the weights are held in under each precision) and
the live parameter count of a loaded model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftlab.config.schema import ModelConfig, PrecisionConfig
from ftlab.distributed.layout import model_parallel_kwargs, pipeline_degree
from ftlab.errors import ModelLoadError
from ftlab.models.compat import apply_fixes
from ftlab.models.config_json import looks_local
from ftlab.models.cpu_layers import install_cpu_layers
from ftlab.models.families import FAMILIES
from ftlab.models.hub_cache import local_model_dir
from ftlab.models.rope import DEFAULT_ROPE_THETA, long_sequence_config
from ftlab.models.weights import check_safetensors_dir, refuse_pickles

log = logging.getLogger(__name__)


def weight_dtype(precision: PrecisionConfig) -> str:
    """The dtype the model's weights are held in: AMP O2 keeps them in the 16-bit dtype,
    O1 (and no AMP) keeps fp32 weights."""
    return precision.dtype if precision.amp_level == "O2" else "float32"


def parameter_counts(model: Any) -> dict[str, int]:
    """Total and trainable parameters of a live model; quantized base weights count too.

    A quantized layer holds its base weight as packed codes (buffers, not parameters), so
    without this the total of a QLoRA model would leave the base out.
    """
    from ftlab.models.quant.qlinear import QuantLoRALinear

    # A tensor-parallel rank holds 1/tp of each split parameter (``is_distributed``): the
    # model's count is the whole, not one rank's shard (a pipeline stage's count remains
    # its own).
    tp = int(model_parallel_kwargs().get("tensor_parallel_degree", 1))

    def whole(p: Any) -> int:
        return int(p.size) * (tp if getattr(p, "is_distributed", False) else 1)

    total = sum(whole(p) for p in model.parameters())
    trainable = sum(whole(p) for p in model.parameters() if not p.stop_gradient)
    for layer in model.sublayers():
        if isinstance(layer, QuantLoRALinear):
            total += layer.in_features * layer.out_features
    return {"total": total, "trainable": trainable}


def load_pretrained(kind: str, loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    path = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not path.is_dir():
        raise ModelLoadError(
            f"model.name_or_path={name_or_path!r}: no such directory. Point it at a local "
            "checkpoint directory or a hub name."
        )
    try:
        return loader.from_pretrained(str(path) if path.is_dir() else name_or_path, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised as one clear line below
        local = path.is_dir()
        where = "local directory" if local else "hub name (needs network or a cache)"
        hint = (  # a local directory's failure is about its files, not the network
            "Check that its files belong together (config.json, weights, tokenizer)."
            if local
            else "On an offline machine set model.name_or_path to a local checkpoint directory."
        )
        raise ModelLoadError(
            f"could not load the {kind} from {name_or_path!r} ({where}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. {hint}"
        ) from err


def paddle_checkpoint(cfg: ModelConfig, name_or_path: str | None = None) -> str:
    """Where PaddleNLP loads ``name_or_path`` (default: the model's) from: a Hugging Face
    checkpoint's converted copy in ftlab's cache (``ftlab.interop.hf_in``), else itself."""
    from ftlab.interop.hf_in import paddle_dir

    return paddle_dir(name_or_path or cfg.name_or_path, cfg.allow_pickle)


def vocabulary_id(tok: Any, token: str) -> int | None:
    """``token``'s id in ``tok``, or None when it is not one of the tokenizer's tokens.

    ``get_vocab()`` first; then the tokenizer's own lookup, accepted only when the id is
    inside the tokenizer and maps back to the same token. PaddleNLP's QWenTokenizer keeps
    its special tokens (``<|endoftext|>``, ``<|extra_0|>``, ...) out of ``get_vocab()``
    (only the tiktoken ranks, as bytes), and a lookup alone would turn an unknown string
    into the unknown token's id under another name.
    """
    vocab = tok.get_vocab()
    if token in vocab:
        return int(vocab[token])
    try:
        idx = tok.convert_tokens_to_ids(token)
        back = tok.convert_ids_to_tokens(idx) if isinstance(idx, int) else None
    except (AttributeError, ValueError, KeyError, IndexError, TypeError):
        return None
    if back != token or not 0 <= idx < len(tok):
        return None
    return int(idx)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from paddlenlp.transformers import AutoTokenizer

    tok = load_pretrained(
        "tokenizer", AutoTokenizer, paddle_checkpoint(cfg, cfg.tokenizer_name_or_path)
    )
    if tok.pad_token is None:
        if cfg.pad_token is None:
            raise ModelLoadError(
                f"the tokenizer of model {cfg.name} has no pad token and model.pad_token is "
                "null. Set model.pad_token to a token that never occurs in your data "
                "(e.g. the unknown token)."
            )
        if vocabulary_id(tok, cfg.pad_token) is None:
            # Setting it anyway would pad with an id outside the embedding (or with the
            # unknown token's id under another name): refused instead.
            raise ModelLoadError(
                f"model.pad_token={cfg.pad_token!r} is not in the vocabulary of model "
                f"{cfg.name}'s tokenizer (which has no pad token of its own). Set "
                "model.pad_token to one of its tokens that never occurs in your data."
            )
        tok.pad_token = cfg.pad_token
        log.info("tokenizer has no pad token: using model.pad_token=%r", cfg.pad_token)
    return tok


def causal_lm_class(pipeline: int) -> Any:
    """PaddleNLP's auto class for the layout: the pipeline (``...Pipe``) model when staged.

    PaddleNLP's Trainer runs a pipeline job through ``PipelineParallel``, which needs the
    model as a ``PipelineLayer`` (embedding, decoder layers, norm and head as one list split
    into stages); the plain causal LM cannot be split.
    """
    from paddlenlp.transformers import AutoModelForCausalLM, AutoModelForCausalLMPipe

    return AutoModelForCausalLMPipe if pipeline > 1 else AutoModelForCausalLM


def model_settings(cfg: ModelConfig, rope_theta: float | None = None) -> dict[str, Any]:
    """PaddleNLP model-config keys for ``model.flash_attention`` and ``model.rope_scaling``
    (``rope_theta``: the checkpoint's rotary base, needed when RoPE is scaled)."""
    out: dict[str, Any] = {}
    if cfg.flash_attention:
        out["use_flash_attention"] = True
    theta = DEFAULT_ROPE_THETA if rope_theta is None else rope_theta
    out.update(long_sequence_config(cfg, theta))
    return out


def checkpoint_rope_theta(cfg: ModelConfig) -> float | None:
    """The checkpoint's rotary base, read from its config (only when RoPE is scaled)."""
    if cfg.rope_scaling.strategy is None:
        return None
    from paddlenlp.transformers import AutoConfig

    config = load_pretrained("model config", AutoConfig, paddle_checkpoint(cfg))
    return float(getattr(config, "rope_theta", 10000.0))


def finish_model(model: Any) -> Any:
    """What every loaded model gets: attention that honours masks and FlashMask indices on
    CPU (``ftlab.models.attention``) and the fast path's RMSNorm and rotary layouts
    (``ftlab.models.cpu_layers``); both step aside on GPU tensors."""
    from ftlab.models.attention import install_cpu_attention

    install_cpu_attention(model)
    install_cpu_layers(model)
    return model


def check_model_dir(cfg: ModelConfig) -> None:
    """Before a local model directory reaches a loader: no pickle read (unless
    ``model.allow_pickle``), no damaged safetensors file (``ftlab.models.weights``)."""

    path = local_model_dir(cfg.name_or_path)  # a cached hub snapshot is checked alike
    if path is not None:
        refuse_pickles(path, cfg.allow_pickle, f"model {cfg.name}'s weights")
        check_safetensors_dir(path)


def load_model(cfg: ModelConfig, dtype: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The base model; ``overrides`` are model-config values set at construction (the
    recompute details, which PaddleNLP's layers read in their constructors)."""
    check_model_dir(cfg)
    apply_fixes()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        **model_settings(cfg, checkpoint_rope_theta(cfg)),
        **(overrides or {}),
    }
    kwargs.update(model_parallel_kwargs())  # tensor-parallel jobs: this rank's shard
    pipeline = pipeline_degree()
    model = load_pretrained("model", causal_lm_class(pipeline), paddle_checkpoint(cfg), **kwargs)
    if pipeline > 1:
        count_shared_weights_once(model)
    return finish_model(model)


def count_shared_weights_once(model: Any) -> None:
    """Make gradient clipping count a weight shared across stages once, not per stage.

    A tied embedding lives on the first and the last stage. Paddle's hybrid-parallel
    clipping skips the copies whose ``is_firstly_shared`` is False, but PipelineLayer
    sets that flag by comparing parameter names with the *attribute* names PaddleNLP
    shares (``embedding_weight``), which never match: both copies are counted, the global
    norm comes out too large and every clipped step is scaled down too much (measured:
    losses drift from a single process by 1e-4 within 3 steps; without clipping they
    agree exactly). Here the lowest rank of each sharing group owns the weight.
    """
    import paddle.distributed as dist

    rank = dist.get_rank()
    for comm in getattr(model, "shared_comm", {}).values():
        for attr in comm["weight_attr"]:
            getattr(comm["layer"], attr).is_firstly_shared = rank == min(comm["ranks"])


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a live causal LM (``<layers_path>`` of its family's row)."""
    fam = FAMILIES.get(model.config.model_type)
    if fam is None:
        raise ModelLoadError(
            f"model type {model.config.model_type!r} is not in ftlab's family table; its "
            "decoder layers are unknown."
        )
    layers = model
    for part in fam.layers_path.split("."):
        layers = getattr(layers, part)
    return layers


def output_logits(out: Any) -> Any:
    """The logits of a causal LM's forward output: a tuple, an output object, or (OPT) the
    bare logits tensor."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "logits", out)


def num_layers(config: Any) -> int:
    """Decoder layers of a live PaddleNLP config (Bloom names them ``n_layer``)."""
    value = getattr(config, "num_hidden_layers", None)
    return int(value if value is not None else config.n_layer)
