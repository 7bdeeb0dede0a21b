"""Rebuild a trained model from what a run saved: base model + the method's artefact.

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

from ftlab.errors import ModelLoadError

METHOD_RECORD = "ftlab_method.json"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def method_of(adapter_dir: Path) -> str:
    """The method a saved directory was trained with, from its ``ftlab_method.json``."""
    record = Path(adapter_dir) / METHOD_RECORD
    if not record.is_file():
        raise ModelLoadError(
            f"{adapter_dir} has no {METHOD_RECORD}: it is not a directory ftlab saved (a "
            "run's final/). Point at a run's final/ directory."
        )
    return str(json.loads(record.read_text())["method"])


def weights_file(trained_dir: Path, stem: str, what: str) -> Path:
    """The one ``<stem>*.pdparams`` in ``trained_dir`` (a Trainer may add a rank suffix)."""
    found = sorted(Path(trained_dir).glob(f"{stem}*.pdparams"))
    if len(found) != 1:
        raise ModelLoadError(
            f"expected one {what} weights file {stem}*.pdparams in {trained_dir}, found "
            f"{[f.name for f in found] or 'none'}."
        )
    return found[0]


def load_trainable_state(model: Any, weights: Path) -> None:
    """Set a PEFT model's trainable tensors from ``weights``, refusing a mismatched set."""
    import paddle

    state = paddle.load(str(weights), return_numpy=True)
    expected = set(model.get_trainable_state_dict())
    if set(state) != expected:
        raise ModelLoadError(
            f"{weights} holds {len(state)} tensors but the model expects {len(expected)} "
            f"(missing: {sorted(expected - set(state))[:3]}); wrong base model?"
        )
    model.set_state_dict(state)


def read_run_config(run_dir: Path) -> tuple[Any, Any, str]:
    """(ModelConfig, method config, model dtype) of a finished run, as it trained."""
    from omegaconf import OmegaConf

    from ftlab.config.schema import ModelConfig
    from ftlab.methods.registry import method_schemas

    path = Path(run_dir) / "resolved_config.yaml"
    if not path.is_file():
        raise ModelLoadError(f"{run_dir} is not an ftlab run directory: no resolved_config.yaml.")
    body = OmegaConf.load(path)
    schemas = method_schemas()
    name = body.method.name
    if name not in schemas:
        raise ModelLoadError(f"{path}: method {name!r} is not registered in this ftlab.")

    def typed(schema: type, node: Any) -> Any:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))

    precision = body.precision
    # As the runner: O2 keeps the weights in the 16-bit dtype, O1 keeps fp32 weights.
    dtype = precision.dtype if precision.amp_level == "O2" else "float32"
    return typed(ModelConfig, body.model), typed(schemas[name], body.method), dtype


def _tokenizer(model_cfg: Any, saved_dir: Path) -> Any:
    """The tokenizer saved with the run (pad token included), else the base model's."""
    from ftlab.models import load_tokenizer

    if all((saved_dir / f).is_file() for f in TOKENIZER_FILES):
        model_cfg = dataclasses.replace(model_cfg, tokenizer_name_or_path=str(saved_dir))
    return load_tokenizer(model_cfg)


def load_adapter(base: Any, adapter_dir: Path, method_name: str, cfg: Any = None) -> Any:
    """``base`` + the artefact in ``adapter_dir``, in eval mode."""
    from ftlab.methods import get_method

    model = get_method(method_name).load(base, Path(adapter_dir), cfg)
    model.eval()
    return model


def load_trained(run_dir: Path | str) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run: its base model with its trained adapter."""
    from ftlab.models import load_model

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / METHOD_RECORD).is_file():
        raise ModelLoadError(
            f"{run_dir} has no final/{METHOD_RECORD}: the run did not finish (or is not an "
            "ftlab run). Pick a completed run directory."
        )
    model_cfg, method_cfg, dtype = read_run_config(run_dir)
    tokenizer = _tokenizer(model_cfg, final)
    if method_cfg.name == "full":
        # final/ is the complete model: loading the base first would only waste memory.
        model = load_model(dataclasses.replace(model_cfg, name_or_path=str(final)), dtype)
        model.eval()
        return model, tokenizer
    base = load_model(model_cfg, dtype)
    return load_adapter(base, final, method_cfg.name, method_cfg), tokenizer


def load_with_adapter(
    base: str, adapter: Path | str, dtype: str = "float32", pad_token: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a base model (hub name or path) and a saved ``final/`` dir.

    ``pad_token`` is only needed when neither the adapter dir nor the base tokenizer
    defines one.
    """
    from ftlab.config.schema import ModelConfig
    from ftlab.models import load_model

    adapter = Path(adapter)
    name = method_of(adapter)
    model_cfg = ModelConfig(name=Path(base).name or base, name_or_path=base, pad_token=pad_token)
    tokenizer = _tokenizer(model_cfg, adapter)
    if name == "full":
        model = load_model(dataclasses.replace(model_cfg, name_or_path=str(adapter)), dtype)
        model.eval()
        return model, tokenizer
    return load_adapter(load_model(model_cfg, dtype), adapter, name), tokenizer
