"""Reading a saved adapter's trainable tensors back into a PEFT model (VeRA, LoKr)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import ModelLoadError


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
