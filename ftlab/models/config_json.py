"""A model directory's ``config.json`` -> family and ``model.arch``, during composition.

``ftlab model.name_or_path=DIR`` needs no model YAML: the family comes from
``model_type`` (and, for the Hugging Face ChatGLM2/3 naming, the keys it uses), every
architecture number from the keys PaddleNLP or Hugging Face write (the family's row names
the keys that differ, e.g. ChatGLM2's ``num_layers`` / ``padded_vocab_size`` /
``multi_query_group_num``). Numbers a model option or an override sets must agree with
the file; a contradiction is refused naming both values, never resolved silently. A hub
name whose snapshot is in the local Hugging Face cache is read like the directory it is
(``ftlab.models.hub_cache``); other hub names are not read (no network): their option
carries the numbers. The resolved numbers
are what the resolved config records. No Paddle import, no weights read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftlab.config.schema import ModelArch, ModelConfig
from ftlab.errors import ConfigError
from ftlab.models.families import FAMILIES, NOT_MODELLED, Family, family
from ftlab.models.hub_cache import find_snapshot, repo_cache_dir, split_revision

CONFIG_FILE = "config.json"

# config.json keys for each model.arch field, first present wins; a family's own
# ``config_keys`` are tried before these.
COMMON_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embed", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size", "ffn_dim", "n_inner"),
    "num_hidden_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "head_dim": ("head_dim",),
    "num_experts_per_tok": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "shared_expert_intermediate_size": ("shared_expert_intermediate_size",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",),
}
# Needed by every model (a model option for a hub name must set them).
REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
MOE_REQUIRED = ("num_experts_per_tok", "moe_intermediate_size")
MLA_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelArch))
# Sizes that are whole numbers >= 1 whenever set (a 0 divides by zero, a string or a
# negative count fails deep inside the model builders).
POSITIVE = (
    *REQUIRED,
    "max_position_embeddings",
    "head_dim",
    *MOE_REQUIRED,
    *MLA_REQUIRED,
)


def check_arch_numbers(arch: Mapping[str, Any]) -> None:
    """Refuse a size that is not a whole number >= 1, naming it (config.json or override)."""
    for key in POSITIVE:
        value = arch.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(
                f"model.arch.{key}={value!r}: must be a whole number >= 1 (read from the "
                "checkpoint's config.json, or set as an override). Fix the config.json."
            )


def model_label(name: str | None, name_or_path: str | None) -> str | None:
    """The model's label in run-dir names and run lists: ``model.name``, else the last part
    of ``model.name_or_path`` (of ``${asset:NAME}``, NAME: read before resolution)."""
    if name not in (None, "", "None"):
        return str(name)
    if not name_or_path:
        return None
    asset = re.fullmatch(r"\$\{asset:([^}]+)\}", str(name_or_path))
    if asset:
        return asset.group(1)
    return Path(str(name_or_path).rstrip("/")).name or str(name_or_path)


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def looks_local(name_or_path: str) -> bool:
    """A path (absolute, relative with ./ or ~, or an existing directory), not a hub name."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ConfigError(
            f"model.name_or_path={str(directory)!r}: no such directory. Point it at a local "
            "checkpoint directory or a hub name."
        )
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path={str(directory)!r}: no {CONFIG_FILE} in the directory, so "
            f"its model type is unknown (model_type: none). ftlab reads the family and "
            f"architecture from it; supported families: {supported()}."
        )
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}).") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(body).__name__}.")
    return body


def _arch_stem(cfg: Mapping[str, Any]) -> str | None:
    """The class name PaddleNLP's auto class picks from ``architectures`` (its stem)."""
    archs = cfg.get("architectures") or []
    name = archs[-1] if archs else cfg.get("init_class")
    if not name:
        return None
    name = name[:-5] if name.endswith("Model") else name
    stems = [f.paddlenlp_arch for f in FAMILIES.values()] + ["ChatGLM", "GPT", "Yuan", "Jamba"]
    # PaddleNLP matches the longest known stem contained in the name (QWen2Moe before QWen).
    matches = [s for s in stems if s.lower() in name.lower()]
    return max(matches, key=len) if matches else None


def hf_chatglm2(cfg: Mapping[str, Any]) -> bool:
    """A Hugging Face ChatGLM2/3 config.json (model_type "chatglm" with ChatGLM2's keys)."""
    return cfg.get("model_type") == "chatglm" and (
        "multi_query_group_num" in cfg or "padded_vocab_size" in cfg
    )


def family_of(cfg: Mapping[str, Any], directory: Path) -> Family:
    model_type = cfg.get("model_type")
    where = f"model.name_or_path={str(directory)!r}"
    if hf_chatglm2(cfg):
        # Hugging Face's ChatGLM2/3 checkpoints say "chatglm" and "ChatGLMModel", which
        # PaddleNLP's AutoModel maps to its ChatGLM v1 class; ftlab's conversion writes
        # PaddleNLP's ChatGLMv2 config beside the converted weights (the family row's
        # ``paddle_config``), and refuses such a config.json beside PaddleNLP-layout weights.
        return family("chatglm_v2")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            stem = _arch_stem(cfg)
            if stem is not None and stem != fam.paddlenlp_arch:
                raise ConfigError(
                    f"{where}: config.json says model_type {model_type!r} but architectures "
                    f"{cfg.get('architectures')}, which PaddleNLP 3.0.0b4 loads as {stem}, "
                    f"not {fam.paddlenlp_arch}. Fix config.json."
                )
            return fam
    if model_type in NOT_MODELLED:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported: {NOT_MODELLED[model_type]}. "
            f"Supported families: {supported()}."
        )
    raise ConfigError(
        f"{where}: model_type {model_type!r} is not a causal-LM family PaddleNLP 3.0.0b4 "
        f"fine-tunes with ftlab. Supported families: {supported()}."
    )


def arch_from_config(cfg: Mapping[str, Any], fam: Family) -> dict[str, Any]:
    """Every ``model.arch`` field from a config.json dict, completed with the family's
    defaults (what PaddleNLP's config class assumes for an absent key)."""
    out: dict[str, Any] = {}
    for name in ARCH_FIELDS:
        for key in (*fam.config_keys.get(name, ()), *COMMON_KEYS.get(name, ())):
            if key in cfg:
                out[name] = cfg[key]
                break
        else:
            if name in fam.config_defaults:
                out[name] = fam.config_defaults[name]
    check_arch_numbers(out)
    if fam.read_config is not None:
        out.update(fam.read_config(cfg, out))
    if not fam.head_dim_from_config and out.get("head_dim") is not None:
        derived = out["hidden_size"] // out["num_attention_heads"]
        if out["head_dim"] != derived:
            raise ConfigError(
                f"config.json has head_dim={out['head_dim']}, but PaddleNLP 3.0.0b4's "
                f"{fam.name} computes the head size as hidden_size / num_attention_heads = "
                f"{derived}: this checkpoint would not load. Use a {fam.name} checkpoint "
                "whose head size is hidden_size / num_attention_heads."
            )
    return out


def complete_arch(arch: dict[str, Any], fam: Family, source: str) -> ModelArch:
    """Fill the optional numbers with their defaults; refuse missing required ones."""
    a = dict(arch)
    if a.get("num_key_value_heads") is None and a.get("num_attention_heads") is not None:
        a["num_key_value_heads"] = a["num_attention_heads"]
    if a.get("tie_word_embeddings") is None:
        a["tie_word_embeddings"] = bool(fam.config_defaults.get("tie_word_embeddings", False))
    if a.get("qkv_bias") is None:
        a["qkv_bias"] = fam.qkv_bias
    a["num_experts"] = a.get("num_experts") or 0
    a["router_bias"] = bool(a.get("router_bias"))
    a["num_nextn_predict_layers"] = a.get("num_nextn_predict_layers") or 0
    required = list(REQUIRED)
    if "max_position_embeddings" not in fam.config_defaults:
        required.append("max_position_embeddings")  # ALiBi families have no fixed context
    if a["num_experts"]:
        required += MOE_REQUIRED
        if a.get("dense_layers") is None:
            a["dense_layers"] = []
    if fam.latent_attention:
        required += MLA_REQUIRED
    missing = [k for k in required if a.get(k) is None]
    if missing:
        also = f" (nor {', '.join(missing[1:])})" if missing[1:] else ""
        raise ConfigError(
            f"model.arch.{missing[0]} is not set{also} and {source}. Set it, or point "
            "model.name_or_path at a local checkpoint directory (its config.json gives "
            "every number)."
        )
    check_arch_numbers(a)
    if a.get("head_dim") is None:
        if a["hidden_size"] % a["num_attention_heads"]:
            raise ConfigError(
                f"model.arch.hidden_size={a['hidden_size']} is not a multiple of "
                f"num_attention_heads={a['num_attention_heads']}; set model.arch.head_dim."
            )
        a["head_dim"] = a["hidden_size"] // a["num_attention_heads"]
    if a["num_experts"] and fam.moe is None:
        raise ConfigError(
            f"model.arch.num_experts={a['num_experts']}: model.family={fam.name} has no "
            "mixture-of-experts layers in PaddleNLP. Set num_experts to 0."
        )
    return ModelArch(**a)


def uncached_hub_name(model: ModelConfig) -> None:
    """A hub name with no snapshot in the local Hugging Face cache: fine with a family (a
    PaddleNLP community name its downloader fetches, numbers from the model option);
    without one, or with an ``@revision`` (only the cache can serve one), refused naming
    where ftlab looked."""
    name = model.name_or_path
    repo, revision = split_revision(name)
    if model.family is not None and revision is None:
        return
    looked = repo_cache_dir(name)
    what = f"revision {revision!r} of {repo}" if revision else name
    fetch = f"huggingface-cli download {repo}" + (f" --revision {revision}" if revision else "")
    also = (
        ""
        if revision
        else f", or set model.family ({supported()}) and model.arch for a name PaddleNLP "
        "downloads itself (a model option such as model=llama3 carries them)"
    )
    raise ConfigError(
        f"model.name_or_path={name!r}: {what} is not in the local Hugging Face cache "
        f"(looked in {looked}; HF_HUB_CACHE or HF_HOME move it), so its config.json cannot "
        f"be read. Run `{fetch}` first, or point model.name_or_path at a local checkpoint "
        f"directory{also}."
    )


def resolve_model(model: ModelConfig) -> ModelConfig:
    """The model with its family, architecture, label and LoRA targets all known.

    A local directory's config.json provides family and numbers (values set in YAML or
    overrides must agree), and so does a hub name's snapshot in the local Hugging Face
    cache; any other hub name relies on its model option.
    """
    set_values = {k: v for k, v in dataclasses.asdict(model.arch).items() if v is not None}
    directory: Path | None = Path(model.name_or_path).expanduser()
    if not looks_local(model.name_or_path):
        # a hub name's cached snapshot is read exactly as the local directory it is
        snapshot = find_snapshot(model.name_or_path)
        directory = snapshot.path if snapshot else None
        if snapshot is None:
            uncached_hub_name(model)
    if directory is not None:
        cfg = read_config_json(directory)
        fam = family_of(cfg, directory)
        if model.family is not None and model.family != fam.name:
            raise ConfigError(
                f"model.family={model.family} contradicts {directory / CONFIG_FILE} "
                f"(model_type {cfg.get('model_type')!r}: family {fam.name}). Remove "
                "model.family (it is read from config.json) or fix it."
            )
        try:
            from_file = complete_arch(arch_from_config(cfg, fam), fam, "config.json lacks it")
        except ConfigError as err:
            raise ConfigError(f"{directory / CONFIG_FILE}: {err}") from None
        read = dataclasses.asdict(from_file)
        for key, value in set_values.items():
            if read[key] != value:
                raise ConfigError(
                    f"model.arch.{key}={value} contradicts {directory / CONFIG_FILE}, which "
                    f"gives {key}={read[key]}. Remove the setting (config.json is read) or "
                    "point model.name_or_path at the checkpoint it describes."
                )
        arch = from_file
    else:  # a hub name PaddleNLP downloads itself: its model option carries the numbers
        fam = family(str(model.family))
        arch = complete_arch(
            set_values,
            fam,
            f"model.name_or_path={model.name_or_path!r} is a hub name that is not in the "
            f"local Hugging Face cache (looked in {repo_cache_dir(model.name_or_path)}; "
            f"`huggingface-cli download {model.name_or_path}` puts it there)",
        )
    targets = model.lora_target_modules
    if targets is None:
        targets = fam.default_targets(arch)
    name = model_label(model.name, model.name_or_path)
    return dataclasses.replace(
        model, name=name, family=fam.name, arch=arch, lora_target_modules=list(targets)
    )
