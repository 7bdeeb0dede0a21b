"""NEFTune (Jain et al. 2023): uniform noise on input embeddings during training only.

PaddleNLP's llm/ scripts register this hook themselves; it is not in the wheel, so ftlab
keeps its own. Noise magnitude: alpha / sqrt(seq_len * hidden), as in the paper.
"""

from __future__ import annotations

import math
from typing import Any


def add_neftune_hook(model: Any, alpha: float) -> Any:
    """Register the hook on the token embedding; returns the hook handle (``.remove()``)."""
    import paddle

    embeddings = model.get_input_embeddings()

    def hook(layer: Any, inputs: Any, output: paddle.Tensor) -> paddle.Tensor:
        if not layer.training:
            return output
        seq_len, hidden = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(seq_len * hidden)
        noise = paddle.uniform(output.shape, dtype=output.dtype, min=-scale, max=scale)
        return output + noise

    return embeddings.register_forward_post_hook(hook)
