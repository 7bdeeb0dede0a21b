"""Fixes for PaddleNLP 3.0.0b4 defects that ftlab meets on the installed Paddle.

Each fix says what is wrong, is applied only where the defect shows, and is idempotent.
"""

from __future__ import annotations

import functools
from typing import Any

from ftlab.models.families import gelu_approximate


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


@functools.cache
def fix_gemma_activation() -> bool:
    """Make PaddleNLP's Gemma MLP compute the activation its config names.

    ``GemmaMLP.forward`` always applies exact GELU (``F.gelu(x)``), whatever
    ``config.hidden_act`` says; transformers' Gemma applies ``hidden_act``, which released
    Gemma configs and transformers' own default set to ``gelu_pytorch_tanh`` (GELU's tanh
    approximation, Paddle's ``approximate=True``). Measured on the transformers-written
    Gemma fixture: logits 6.1e-4 apart, the first difference at layer 0's ``down_proj``
    input (gate and up projections equal to 7e-7). The replacement reads the activation
    once per layer (``ftlab.models.families.gelu_approximate``: the names accepted, all
    others refused when config.json is read) and is otherwise the same GeGLU. A config
    saying ``gelu`` (PaddleNLP's own default) computes exactly what it did before.
    """
    import paddle.nn.functional as F  # noqa: N812
    from paddlenlp.transformers.gemma.modeling import GemmaMLP

    original_init = GemmaMLP.__init__

    def __init__(self: Any, config: Any) -> None:  # noqa: N807
        original_init(self, config)
        self.gelu_approximate = gelu_approximate(getattr(config, "hidden_act", "gelu"))

    def forward(self: Any, x: Any) -> Any:
        gate = F.gelu(self.gate_proj(x), approximate=self.gelu_approximate)
        return self.down_proj(gate * self.up_proj(x))

    GemmaMLP.__init__ = __init__
    GemmaMLP.forward = forward
    return True


@functools.cache
def fix_moe_gate_training_weights() -> bool:
    """Make PaddleNLP's top-k MoE gate weigh the experts in training as it does in eval.

    ``PretrainedMoEGate.topkgating`` (Qwen2-MoE, DeepSeek-V2/V3) computes the routing
    weights twice: in eval from the top-k scores, normalised when ``norm_topk_prob`` and
    multiplied by ``routed_scaling_factor`` (what DeepSeek's reference code and
    transformers compute); in training from the masked scores without
    ``routed_scaling_factor``. With a factor other than 1 (DeepSeek-V3: 2.5) training
    fine-tunes another function than the checkpoint's: measured on the transformers-written
    DeepSeek-V3 fixture, train-mode logits 1.18 away from transformers' while eval-mode
    logits agree to 1.5e-6. Here the gate always takes the eval arithmetic (the same
    experts, differentiable in the gate weight alike; the auxiliary losses do not depend on
    the mode). For the families whose factor is 1 nothing changes.
    """
    from paddlenlp.transformers.moe_gate import PretrainedMoEGate

    original = PretrainedMoEGate.topkgating

    def topkgating(self: Any, gates: Any) -> Any:
        training = self.training
        self.training = False
        try:
            return original(self, gates)
        finally:
            self.training = training

    PretrainedMoEGate.topkgating = topkgating
    return True


@functools.cache
def fix_deepseek_v3_generation() -> bool:
    """Give PaddleNLP's DeepSeek-V3 causal LM the generation hooks its V2 sibling has.

    ``DeepseekV3ForCausalLM`` (the V2 model underneath, same forward arguments) defines no
    ``prepare_inputs_for_generation``, so ``generate`` falls back to the generic one, which
    passes ``input_ids`` only: no attention mask, no position ids, no key/value cache. A
    left-padded prompt in a batch then attends to its padding at shifted positions
    (measured: ftlab-predict's greedy output for the shorter of two prompts differed from
    transformers' from the first token, while logits of the same inputs agreed to 1.8e-6).
    The V2 class's two hooks are taken as they are."""
    from paddlenlp.transformers.deepseek_v2.modeling import DeepseekV2ForCausalLM
    from paddlenlp.transformers.deepseek_v3.modeling import DeepseekV3ForCausalLM

    if "prepare_inputs_for_generation" in DeepseekV3ForCausalLM.__dict__:
        return False
    for hook in ("prepare_inputs_for_generation", "update_model_kwargs_for_generation"):
        setattr(DeepseekV3ForCausalLM, hook, DeepseekV2ForCausalLM.__dict__[hook])
    return True


def apply_fixes() -> None:
    """Every fix above (each checks itself whether the installed Paddle needs it)."""
    fix_moe_gate_priority()
    fix_mixtral_expert_weights()
    fix_gemma_activation()
    fix_moe_gate_training_weights()
    fix_deepseek_v3_generation()
