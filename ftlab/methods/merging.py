"""Folding linear adapters into plain ``nn.Linear`` layers, shared by every mergeable method.

Each adapter layer (LoRA and its variants, VeRA, LoKr) computes ``x @ W + b + f(x)`` with
``f`` linear in ``x``, i.e. ``f(x) = x @ D`` for some ``D`` of the weight's shape
``[in, out]``. Merging replaces the adapter layer by a plain ``nn.Linear`` with weight
``W + D``, so the merged model has exactly the base architecture's parameter names and
loads with ``AutoModelForCausalLM.from_pretrained``. Methods supply ``D`` per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fold_linear_adapters(model: Any, delta_of: Callable[[Any], Any | None], kind: str) -> int:
    """Replace every layer for which ``delta_of`` returns a ``[in, out]`` delta; count them.

    ``kind`` names the adapter in the error raised when no layer was folded (a merge that
    changed nothing would otherwise pass silently).
    """
    import paddle
    from paddle import nn
    from paddlenlp.transformers.model_utils import dtype_guard

    targets = []
    for name, layer in model.named_sublayers():
        delta = delta_of(layer)
        if delta is not None:
            targets.append((name, layer, delta))
    if not targets:
        raise ValueError(f"no {kind} layer found in the model: nothing to merge")
    with paddle.no_grad():
        for name, layer, delta in targets:
            weight = layer.weight
            merged = (weight.astype("float32") + delta.astype("float32")).astype(weight.dtype)
            with dtype_guard(str(weight.dtype).replace("paddle.", "")):
                plain = nn.Linear(
                    weight.shape[0],
                    weight.shape[1],
                    bias_attr=False if layer.bias is None else None,
                )
            plain.weight.set_value(merged)
            plain.weight.stop_gradient = True
            if layer.bias is not None:
                plain.bias = layer.bias
            _set_sublayer(model, name, plain)
    return len(targets)


def _set_sublayer(model: Any, dotted: str, new: Any) -> None:
    parent = model
    *path, last = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new)
