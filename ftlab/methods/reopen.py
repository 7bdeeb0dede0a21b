"""Reopen a finished run: its base model + the method's saved artefact, ready to generate.

``load_trained(run_dir)`` reads the run's ``resolved_config.yaml`` (which base, which
method, which settings, which dtype) and its ``final/`` directory. ``load_with_adapter``
does the same from a base model and a saved directory alone (``final/`` holds
``ftlab_method.json`` naming the method). Both return ``(model, tokenizer)`` with the
model in eval mode; ``predict`` and ``merge`` use them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ftlab.config.schema import MethodConfig, ModelConfig, PrecisionConfig
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.evaluation.generation import prompt_ids
from ftlab.methods.catalog import get_method, method_schemas
from ftlab.models.loading import load_model, load_tokenizer, output_logits, weight_dtype
from ftlab.models.weights import changed_weights, check_safetensors_dir, refuse_pickles
from ftlab.record.rundir import BASE_WEIGHTS, METHOD_RECORD, RESOLVED_CONFIG, RunDir

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
PROBE = "Once upon a time, there was a little dog named Max. He liked to play."


def method_of(adapter_dir: Path) -> str:
    """The method a saved directory was trained with, from its ``ftlab_method.json``."""
    record = Path(adapter_dir) / METHOD_RECORD
    if not record.is_file():
        raise ModelLoadError(
            f"{adapter_dir} has no {METHOD_RECORD}: it is not a directory ftlab saved (a "
            "run's final/). Point at a run's final/ directory."
        )
    return str(json.loads(record.read_text())["method"])


def read_run_config(run_dir: Path) -> tuple[Any, Any, str]:
    """(ModelConfig, method config, model dtype) of a finished run, as it trained; the
    model is the one the run loaded as its base (``derived.init_model`` after init_from)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise ModelLoadError(f"{run_dir} is not an ftlab run directory: no {RESOLVED_CONFIG}.")
    body = OmegaConf.load(path)
    schemas = method_schemas()
    name = body.method.name
    if name not in schemas:
        raise ModelLoadError(f"{path}: method {name!r} is not registered in this ftlab.")

    def typed(schema: type, node: Any) -> Any:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))

    dtype = weight_dtype(typed(PrecisionConfig, body.precision))
    model = typed(ModelConfig, body.model)
    init_model = (body.get("derived") or {}).get("init_model")
    if init_model:  # the run started from another (init_from): its adapter sits on that
        model = dataclasses.replace(model, name_or_path=str(init_model))
    return model, typed(schemas[name], body.method), dtype


def _tokenizer(model_cfg: ModelConfig, saved_dir: Path) -> Any:
    """The tokenizer saved with the run (pad token included), else the base model's."""
    if all((saved_dir / f).is_file() for f in TOKENIZER_FILES):
        model_cfg = dataclasses.replace(model_cfg, tokenizer_name_or_path=str(saved_dir))
    return load_tokenizer(model_cfg)


def check_saved_dir(saved_dir: Path, allow_pickle: bool) -> None:
    """A run's ``final/`` (or any saved dir) before a method reads it: no pickle (unless
    allowed), no damaged or missing safetensors file."""

    refuse_pickles(saved_dir, allow_pickle, "a trained model or adapter")
    check_safetensors_dir(saved_dir)


def check_base_unchanged(final: Path, base: str, allow_pickle: bool) -> None:
    """Refuse a base model whose weights differ from the ones the run trained on (the
    adapter would silently give another model's predictions). A pickle is named first."""

    refuse_pickles(base, allow_pickle, "the base model's weights")
    recorded = json.loads((final / METHOD_RECORD).read_text()).get(BASE_WEIGHTS) or {}
    changed = changed_weights(base, recorded)
    if changed:
        raise ModelLoadError(
            f"the base model {base} changed since the run trained ({'; '.join(changed)}): "
            "its trained weights belong to the original base. Restore it, or retrain."
        )


def load_adapter(
    base: Any,
    adapter_dir: Path,
    method_name: str,
    cfg: MethodConfig | None = None,
    allow_pickle: bool = False,
) -> Any:
    """``base`` + the artefact in ``adapter_dir``, in eval mode."""
    check_saved_dir(Path(adapter_dir), allow_pickle)
    model = get_method(method_name).load(base, Path(adapter_dir), cfg)
    model.eval()
    return model


def load_trained(run_dir: Path | str, allow_pickle: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run: its base model with its trained adapter.

    ``allow_pickle`` is the caller's (its command line), never the run's recorded one: a
    run dir's files must not be able to grant themselves permission to run code."""
    run_dir = Path(run_dir)
    final = RunDir(run_dir).final
    if not (final / METHOD_RECORD).is_file():
        raise ModelLoadError(
            f"{run_dir} has no final/{METHOD_RECORD}: the run did not finish (or is not an "
            "ftlab run). Pick a completed run directory."
        )
    model_cfg, method_cfg, dtype = read_run_config(run_dir)
    model_cfg = dataclasses.replace(model_cfg, allow_pickle=allow_pickle)
    check_saved_dir(final, allow_pickle)
    whole = get_method(method_cfg.name).saves_whole_model
    if not whole:  # before the tokenizer: a refused base costs no PaddleNLP import
        check_base_unchanged(final, model_cfg.name_or_path, allow_pickle)
    tokenizer = _tokenizer(model_cfg, final)
    if whole:
        # final/ is the complete model: loading the base first would only waste memory.
        model = load_model(dataclasses.replace(model_cfg, name_or_path=str(final)), dtype)
        model.eval()
        return model, tokenizer
    base = load_model(model_cfg, dtype)
    return load_adapter(base, final, method_cfg.name, method_cfg, allow_pickle), tokenizer


def load_with_adapter(
    base: str,
    adapter: Path | str,
    dtype: str = "float32",
    pad_token: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a base model (hub name or path) and a saved ``final/`` dir.

    ``pad_token`` is only needed when neither the adapter dir nor the base tokenizer
    defines one.
    """
    adapter = Path(adapter)
    name = method_of(adapter)
    model_cfg = ModelConfig(
        name=Path(base).name or base,
        name_or_path=base,
        pad_token=pad_token,
        allow_pickle=allow_pickle,
    )
    check_saved_dir(adapter, allow_pickle)
    whole = get_method(name).saves_whole_model
    if not whole:  # before the tokenizer, as in load_trained
        check_base_unchanged(adapter, base, allow_pickle)
    tokenizer = _tokenizer(model_cfg, adapter)
    if whole:
        model = load_model(dataclasses.replace(model_cfg, name_or_path=str(adapter)), dtype)
        model.eval()
        return model, tokenizer
    return load_adapter(load_model(model_cfg, dtype), adapter, name, None, allow_pickle), tokenizer


# --------------------------------------------------------------------------- merging


def check_mergeable(method_name: str) -> None:
    """Raise ``ConfigError`` with the reason when ``method_name`` cannot be merged."""
    reason = get_method(method_name).merge_unsupported
    if reason is not None:
        raise ConfigError(f"a {method_name} model cannot be merged into its base: {reason}")


def probe_logits(model: Any, tokenizer: Any) -> Any:
    import paddle

    ids = prompt_ids(tokenizer, PROBE)
    with paddle.no_grad():
        out = model(input_ids=paddle.to_tensor([ids], dtype="int64"))

    return output_logits(out).astype("float32").numpy()


def merge_model(model: Any, tokenizer: Any, method_name: str) -> tuple[Any, float]:
    """The merged plain model and the max |logit| difference it shows on the probe."""
    import numpy as np

    before = probe_logits(model, tokenizer)
    merged = get_method(method_name).merge(model)
    merged.eval()
    after = probe_logits(merged, tokenizer)
    diff = float(np.abs(after - before).max())
    tolerance = 1e-3 * max(1.0, float(np.abs(before).max()))
    if not diff <= tolerance:
        raise ModelLoadError(
            f"the merged {method_name} model's logits differ from the adapter model's by "
            f"{diff:.3g} (> {tolerance:.3g}) on a probe prompt; refusing to write it."
        )
    return merged, diff
