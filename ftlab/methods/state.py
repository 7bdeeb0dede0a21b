"""A PEFT model's trainable tensors as safetensors: ftlab's save and load for VeRA and LoKr.

PaddleNLP's ``VeRAModel`` and ``LoKrModel`` save their trainable tensors with
``paddle.save`` (a pickle: loading a saved directory from someone else could run code).
ftlab's subclasses write ``ADAPTER_STATE`` instead, in ``final/`` and in every Trainer
checkpoint, and read only that (``FtlabTrainer`` loads it on resume). Tensors are stored
in float32 (NumPy has no bfloat16) and cast back to each parameter's dtype on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ftlab.errors import ModelLoadError
from ftlab.models.weights import read_safetensors

ADAPTER_STATE = "ftlab_adapter.safetensors"


def save_peft_model(model: Any, save_directory: str, config: Any, **kwargs: Any) -> None:
    """What ``VeRAModel`` / ``LoKrModel.save_pretrained`` write, without a pickle: the
    adapter config, the base model's config and ``ADAPTER_STATE``."""
    import paddle
    from safetensors.numpy import save_file

    if not kwargs.get("is_main_process", paddle.distributed.get_rank() == 0):
        return
    os.makedirs(save_directory, exist_ok=True)
    tensors = {k: v.astype("float32").numpy() for k, v in model.get_trainable_state_dict().items()}
    save_file(tensors, os.path.join(save_directory, ADAPTER_STATE), metadata={"format": "np"})
    type(config)(**config.to_dict()).save_pretrained(save_directory)
    if kwargs.get("save_model_config", True):
        model.model.config.save_pretrained(save_directory)


def load_trainable_state(model: Any, trained_dir: Path) -> None:
    """Set a PEFT model's trainable tensors from ``trained_dir``, refusing a mismatched set."""
    import paddle

    path = Path(trained_dir) / ADAPTER_STATE
    if not path.is_file():
        pickled = sorted(p.name for p in Path(trained_dir).glob("*_model_state.pdparams"))
        why = (
            f"it holds {pickled[0]}, a pickle, which ftlab does not load (it could run code)"
            if pickled
            else "no adapter weights at all"
        )
        raise ModelLoadError(f"{trained_dir} has no {ADAPTER_STATE}: {why}.")
    state = read_safetensors(path)
    expected = model.get_trainable_state_dict()
    if set(state) != set(expected):
        raise ModelLoadError(
            f"{path} holds {len(state)} tensors but the model expects {len(expected)} "
            f"(missing: {sorted(set(expected) - set(state))[:3]}); wrong base model?"
        )
    model.set_state_dict(
        {k: paddle.to_tensor(v).astype(expected[k].dtype) for k, v in state.items()}
    )
