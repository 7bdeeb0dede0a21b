"""Hugging Face checkpoints out: a merged model in the layout transformers, vLLM, SGLang and
TGI read (``ftlab-merge RUN_DIR --format hf --out DIR``).

The inverse of ``ftlab.interop.hf_in``, with the same source of truth: the PaddleNLP model
class's ``_get_name_mappings`` (PaddleNLP name -> Hugging Face name, and which weights are
transposed; a mapping that is anything but a rename or a transpose is refused by family).
Weights are written ``[out, in]`` in the dtype asked for, a tied head is left out (as
transformers' ``save_pretrained`` does), shards hold at most ``max_shard_size`` bytes
with ``model.safetensors.index.json`` when there is more than one, metadata
``{"format": "pt"}``. ``config.json`` is the base model's own (its ``model_type``,
``architectures`` and family keys) with the dtype updated; ``generation_config.json``
carries the special-token ids; the tokenizer is written in Hugging Face's layout with the
chat template the run trained with (``ftlab.interop.hf_tokenizer``). Everything is written
into a temporary sibling directory that is renamed to ``out`` at the end: a killed export
leaves no half-written model under the requested name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.errors import ConfigError
from ftlab.interop.hf_in import paddle_dir, write_safetensors
from ftlab.interop.hf_tokenizer import write_hf_tokenizer
from ftlab.models.config_json import family_of, read_config_json
from ftlab.models.families import FAMILIES

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Families whose Hugging Face checkpoints need the model repository's own code
# (trust_remote_code): transformers has no class that would read an export.
REMOTE_CODE = {
    "qwen": "Qwen (v1) checkpoints run on the model repository's own code "
    "(trust_remote_code); transformers has no QWen class to read an export",
    "chatglm_v2": "ChatGLM2/3 checkpoints run on the model repository's own code "
    "(trust_remote_code); transformers has no ChatGLM class to read an export",
}
# PaddleNLP-only config keys (parallelism, kernels, its own loss options): not Hugging Face's.
PADDLE_ONLY_KEYS = re.compile(
    r"^(tensor_parallel|sep_parallel|context_parallel|pipeline_parallel|sequence_parallel|"
    r"fuse_|use_flash|use_fused|use_recompute|recompute|pp_|virtual_pp|no_recompute|"
    r"dpo_config|kto_config|lm_shift_labels|use_last_token|immediate_clear|"
    r"use_long_sequence|long_sequence|alibi|quantization_config|"
    r"refined_recompute|moe_subbatch|use_fast_layer_norm|seq_length$|dtype$|"
    r"paddlenlp_version|_name_or_path|tensor_parallel_output|fp16_opt_level)"
)
EXPORT_RECORD = "ftlab_export.json"


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``40KB`` or a byte count -> bytes (Hugging Face's units: 1000s)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size={text!r}: expected a size such as 5GB or 500MB.")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * scale[unit])


def check_out_dir(out: Path) -> None:
    """The export goes to a new directory, never inside a run directory."""
    if out.exists():
        raise ConfigError(f"--out {out} exists; give a new directory (nothing is overwritten).")
    for parent in out.resolve().parents:
        if (parent / "resolved_config.yaml").is_file() or (parent / ".hydra").is_dir():
            raise ConfigError(
                f"--out {out} is inside the run directory {parent}; finished runs are never "
                "modified. Give a directory outside it."
            )


def check_family(family_name: str) -> None:
    if family_name in REMOTE_CODE:
        raise ConfigError(
            f"--format hf: family {family_name} cannot be written for transformers: "
            f"{REMOTE_CODE[family_name]}. Use the default (PaddleNLP) format."
        )


def hf_names(cls: Any, config: Any) -> dict[str, tuple[str, bool]]:
    """PaddleNLP parameter name -> (Hugging Face name, transpose) from the model class's
    own name mappings."""
    if not getattr(config, "architectures", None):
        config.architectures = [cls.__name__]
    out = {}
    for m in cls._get_name_mappings(config):
        if m.action not in (None, "transpose"):
            raise ConfigError(
                f"--format hf: PaddleNLP's {cls.__name__} maps {m.source_name} with "
                f"a {m.action!r} step, which ftlab does not invert. Use the default format."
            )
        out[m.target_name] = (m.source_name, m.should_transpose())
    return out


def _numpy(value: Any, dtype: str) -> np.ndarray:
    """The tensor in ``dtype`` as numpy (bfloat16 as its uint16 bits, which Paddle gives)."""
    return np.ascontiguousarray(value.astype(dtype).numpy())


def head_tied(model: Any) -> bool:
    """Whether the export leaves the output matrix out (transformers ties it to the embedding).

    A family whose PaddleNLP class keeps a tied checkpoint's head as a separate copy (its
    row's ``tied_head_copy``: OPT) is tied while the copy equals the embedding (LoRA leaves
    both alone); once full fine-tuning has moved them apart, the head is written and the
    export is untied, so transformers computes the model that was trained."""
    fam = FAMILIES.get(model.config.model_type)
    if fam is not None and fam.tied_head_copy:
        state = model.state_dict()
        embedding, head = (state[name].numpy() for name in fam.tied_head_copy)
        return bool(np.array_equal(embedding, head))
    return bool(getattr(model.config, "tie_word_embeddings", False))


def export_weights(model: Any, out: Path, dtype: str, max_shard_bytes: int) -> dict[str, Any]:
    """Write the model's weights in Hugging Face's names and layout into ``out``."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: --format hf writes one of {', '.join(DTYPES)}.")
    names = hf_names(type(model), model.config)
    tied = head_tied(model)
    fam = FAMILIES.get(model.config.model_type)
    if not tied and fam is not None and fam.tied_head_copy:
        names[fam.tied_head_copy[1]] = ("lm_head.weight", False)  # same [vocab, hidden]
    tensors: list[tuple[str, np.ndarray]] = []
    left_out = []
    for name, value in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            left_out.append(name)  # the tied head is the embedding (transformers omits it)
            continue
        if name not in names:
            if "rotary_emb" in name:
                left_out.append(name)  # recomputed from the config
                continue
            raise ConfigError(
                f"--format hf: the merged model has tensor {name!r}, which PaddleNLP's "
                f"{type(model).__name__} name mappings do not name; it cannot be exported "
                "without losing it."
            )
        hf, transpose = names[name]
        arr = _numpy(value, dtype)
        tensors.append((hf, arr.T.copy() if transpose else arr))
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[1].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1].nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        write_safetensors(out / name, {k: (DTYPES[dtype], v) for k, v in shard}, fmt="pt")
        weight_map.update(dict.fromkeys((k for k, _ in shard), name))
    total = sum(v.nbytes for _, v in tensors)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"tensors": len(tensors), "shards": len(shards), "bytes": total, "left_out": left_out}


def hf_config(model: Any, base_config: dict[str, Any] | None, family: Any, dtype: str) -> dict:
    """The base model's config.json (else PaddleNLP's config, its own keys removed), with
    Hugging Face's ``model_type`` and ``architectures`` and the export's dtype."""
    body = dict(base_config) if base_config else model.config.to_dict()
    body = {k: v for k, v in body.items() if not PADDLE_ONLY_KEYS.match(k)}
    body["model_type"] = family.model_types[0]
    body["architectures"] = [family.causal_lm_class]
    body["torch_dtype"] = dtype
    body["tie_word_embeddings"] = head_tied(model)
    return dict(sorted(body.items()))


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if config.get(k) is not None}


def export_hf(
    model: Any,
    tokenizer: Any,
    *,
    out: Path,
    family: Any,
    base_config: dict[str, Any] | None,
    tokenizer_dir: Path,
    chat_template: str | None,
    dtype: str,
    max_shard_bytes: int,
    record: dict[str, Any],
) -> Path:
    """Write the whole export into ``out`` (which must not exist), atomically."""
    check_family(family.name)
    check_out_dir(out)
    with building(out) as tmp:
        weights = export_weights(model, tmp, dtype, max_shard_bytes)
        config = hf_config(model, base_config, family, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(config), indent=2) + "\n"
        )
        write_hf_tokenizer(tokenizer, tokenizer_dir, tmp, chat_template)
        body = {**record, "format": "hf", "dtype": dtype, "weights": weights}
        (tmp / EXPORT_RECORD).write_text(json.dumps(body, indent=2) + "\n")
    return out


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block
    finishes (removed when it fails): no half-written export under the requested name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- PEFT adapters

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# lora_config.json switches that change what the adapter computes beyond x @ A @ B * scale
# (or the base it sits on): PEFT's LoRA cannot express them.
LORA_VARIANTS = {
    "lora_use_mixer": "MoSLoRA's r x r mixer between A and B",
    "use_mora": "MoRA's square matrix",
    "pissa": "PiSSA rewrites the base weights",
    "loraga": "LoRA-GA rescales the base weights",
    "do_qat": "quantization-aware training",
    "trainable_bias": "trained biases outside the adapter",
    "trainable_modules": "fully trained modules outside the adapter",
}


def check_peft_method(method: str) -> None:
    if method != "lora":
        raise ConfigError(
            f"--format hf-peft: a {method} adapter cannot be written as a PEFT LoRA adapter "
            "(only method=lora maps onto PEFT's LoRA one to one). Use --format hf to write "
            "the merged model instead (prefix tuning and ReFT cannot be merged either)."
        )


def export_peft(final: Path, out: Path, base: str, record: dict[str, Any]) -> Path:
    """The run's LoRA adapter (``final/``) as a PEFT adapter: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with PEFT's names (``base_model.model.<HF module>.lora_A
    .weight``, ``[r, in]``; ``lora_B`` ``[out, r]``). Reads files only: no model is built."""
    import paddlenlp.transformers as pt
    from paddlenlp.transformers import AutoConfig
    from safetensors import safe_open

    check_out_dir(out)
    lora = json.loads((final / "lora_config.json").read_text())
    for key, what in LORA_VARIANTS.items():
        if lora.get(key):
            raise ConfigError(
                f"--format hf-peft: the adapter uses {key} ({what}), which PEFT's LoRA "
                "cannot express. Use --format hf (the merged model)."
            )
    base_dir = Path(paddle_dir(base, False))
    fam = family_of(read_config_json(base_dir), base_dir)
    check_family(fam.name)
    cls = getattr(pt, fam.causal_lm_class)
    config = AutoConfig.from_pretrained(str(base_dir))
    names = {
        paddle.removesuffix(".weight"): (hf.removesuffix(".weight"), t)
        for paddle, (hf, t) in hf_names(cls, config).items()
    }
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    leaves = set()
    for path in sorted(final.glob("peft_model*.safetensors")):
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part not in ("lora_A", "lora_B") or module not in names:
                    raise ConfigError(
                        f"--format hf-peft: {path.name} holds {key!r}, which is not a LoRA "
                        "matrix of a weight PaddleNLP's name mappings know; cannot convert."
                    )
                hf_module, _ = names[module]
                value = f.get_tensor(key).astype(np.float32)
                # Paddle: x @ A[in, r] @ B[r, out]; PEFT: B(A(x)), A.weight [r, in].
                tensors[f"base_model.model.{hf_module}.{part}.weight"] = (
                    "F32",
                    np.ascontiguousarray(value.T),
                )
                leaves.add(hf_module.rsplit(".", 1)[-1])
    if not tensors:
        raise ConfigError(f"--format hf-peft: no LoRA weights in {final}.")
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": int(lora["r"]),
        "lora_alpha": float(lora["lora_alpha"]),
        "use_rslora": bool(lora.get("rslora")),
        "lora_dropout": float(lora.get("lora_dropout") or 0.0),
        "target_modules": sorted(leaves),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with building(out) as tmp:
        write_safetensors(tmp / PEFT_WEIGHTS, tensors, fmt="pt")
        (tmp / PEFT_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
        body = {**record, "format": "hf-peft", "tensors": len(tensors)}
        (tmp / EXPORT_RECORD).write_text(json.dumps(body, indent=2) + "\n")
    return out
