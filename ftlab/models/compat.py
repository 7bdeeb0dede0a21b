"""Fixes for PaddleNLP 3.0.0b4 defects that ftlab meets on the installed Paddle.

Each fix says what is wrong, is applied only where the defect shows, and is idempotent.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def fix_moe_gate_priority() -> bool:
    """Make PaddleNLP's MoE gate route tokens on a Paddle whose cumsum widens int32.

    ``PretrainedMoEGate._priority`` (Qwen2-MoE and DeepSeek-V2/V3 routing) multiplies
    ``cumsum(mask)`` by ``mask`` with an int32 mask. Paddle 3.3's cumsum returns int64
    for int32 input and then refuses the mixed int64 x int32 product, so every forward
    pass of those models fails (measured with paddlepaddle 3.3.1, CPU). The replacement
    computes the same dispatch mask in int64 throughout. Returns whether it was needed.
    """
    import paddle
    import paddle.nn.functional as F  # noqa: N812
    from paddlenlp.transformers.moe_gate import PretrainedMoEGate

    if paddle.cumsum(paddle.ones([1], dtype="int32")).dtype == paddle.int32:
        return False

    def _priority(self: Any, topk_idx: paddle.Tensor, capacity: int) -> paddle.Tensor:
        # Top-1 choices first: each (choice, token) row one-hot over experts.
        expert_index = paddle.transpose(topk_idx, [1, 0]).reshape([-1])
        expert_mask = F.one_hot(expert_index, self.num_experts).cast(paddle.int64)
        # Position of the token in its expert's buffer (-1 where not routed there).
        position = paddle.cumsum(expert_mask, axis=0) * expert_mask - 1
        position = paddle.transpose(position.reshape((self.top_k, -1, self.num_experts)), [1, 0, 2])
        position = paddle.max(position, axis=1)  # [tokens, experts]
        valid = paddle.logical_and(position >= 0, position < capacity)
        position = paddle.masked_fill(position, ~valid, 0)
        dispatch = F.one_hot(position, capacity).cast(paddle.int32)
        valid = valid.unsqueeze(-1).expand(valid.shape + [capacity])
        return paddle.masked_fill(dispatch, ~valid, 0)

    PretrainedMoEGate._priority = _priority
    return True


@functools.cache
def fix_mixtral_expert_weights() -> bool:
    """Make PaddleNLP's Mixtral MoE block run on a Paddle whose advanced indexing is flat.

    ``MixtralSparseMoeBlock.forward`` scales each expert's output ``[n, hidden]`` by
    ``routing_weights[top_x, idx]`` with ``top_x, idx`` from ``paddle.where`` (``[n, 1]``
    each). Paddle 3.3 returns that selection as ``[n]``, which does not broadcast against
    ``[n, hidden]``, so every Mixtral forward pass fails (measured with paddlepaddle 3.3.1,
    CPU). The replacement below is the same routing with the weights as a column.
    """
    import paddle
    import paddle.nn.functional as F  # noqa: N812
    from paddlenlp.transformers.mixtral.modeling import MixtralSparseMoeBlock

    probe = paddle.ones([3, 2])
    rows, cols = paddle.where(paddle.to_tensor([[True, False], [False, True]]))
    if probe[rows, cols].ndim != 1:
        return False

    def forward(self: Any, hidden_states: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape([-1, hidden])
        router_logits = self.gate(x)
        with paddle.amp.auto_cast(False):
            weights = F.softmax(router_logits.astype("float32"), axis=1)
        weights, chosen = paddle.topk(weights, self.top_k, axis=-1)
        weights = (weights / weights.sum(axis=-1, keepdim=True)).astype(x.dtype)
        out = paddle.zeros([batch * seq, hidden], dtype=x.dtype)
        # [experts, top_k, tokens]: which token chose which expert in which slot
        routed = F.one_hot(chosen, num_classes=self.num_experts).transpose([2, 1, 0]).astype("bool")
        for e in range(self.num_experts):
            slot, token = paddle.where(routed[e])
            if token.shape[0] == 0:
                continue
            slot, token = slot.reshape([-1]), token.reshape([-1])
            y = self.experts[e](paddle.gather(x, token)) * weights[token, slot].reshape([-1, 1])
            out = paddle.index_add(out, token, 0, y.astype(x.dtype))
        return out.reshape([batch, seq, hidden]), router_logits

    MixtralSparseMoeBlock.forward = forward
    return True


def apply_fixes() -> None:
    """Every fix above (each checks itself whether the installed Paddle needs it)."""
    fix_moe_gate_priority()
    fix_mixtral_expert_weights()
