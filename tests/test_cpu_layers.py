"""The CPU fast path's RMSNorm and rotary embedding compute PaddleNLP's functions: the same
logits and gradients as PaddleNLP's own layers, on the families whose layers they
replace, in training and in batched (left-padded) generation-style inputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import paddle
import pytest
from helpers import tiny_model

import ftlab.models.cpu_layers as cpu_layers
from ftlab.models.cpu_layers import install_cpu_layers, use_fast_cpu_layers


@pytest.fixture
def counted() -> Iterator[dict[str, int]]:
    """Counts the calls that took ftlab's layouts (fast on)."""
    calls = {"norm": 0, "rotary": 0}
    real_plain = cpu_layers._plain_cpu

    def plain(tensor: paddle.Tensor) -> bool:
        taken = real_plain(tensor)
        calls["norm" if tensor.ndim == 3 else "rotary"] += int(taken)
        return taken

    cpu_layers._plain_cpu = plain
    try:
        yield calls
    finally:
        cpu_layers._plain_cpu = real_plain
        use_fast_cpu_layers(True)


def _logits_and_grads(model: paddle.nn.Layer) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 8, 7, 6, 5, 4], [0, 0, 3, 4, 5, 6]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model.clear_gradients()
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    out = model(**{k: paddle.to_tensor(v) for k, v in batch.items()}, return_dict=True)
    (out.logits * paddle.to_tensor(mask[..., None], "float32")).sum().backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.numpy() * mask[..., None], grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_norm_and_rotary_equal_paddlenlp(family: str, counted: dict[str, int]) -> None:
    model = tiny_model(family)
    model.config.use_flash_attention = False
    model.train()
    assert install_cpu_layers(model) == 5  # 2 layers x 2 norms + the final norm
    use_fast_cpu_layers(False)
    ref_logits, ref_grads = _logits_and_grads(model)
    assert counted == {"norm": 0, "rotary": 0}
    use_fast_cpu_layers(True)
    logits, grads = _logits_and_grads(model)
    # 2 layers: 2 norms each + the final norm; one rotary call per layer.
    assert counted == {"norm": 5, "rotary": 2}
    # RMSNorm's square is exact where Paddle's pow is not (~1 ulp): 1e-5, as attention's.
    assert np.abs(logits - ref_logits).max() < 1e-5 * max(1.0, np.abs(ref_logits).max())
    assert grads.keys() == ref_grads.keys() and any("norm" in n for n in grads)
    for name, grad in grads.items():
        scale = max(1.0, float(np.abs(ref_grads[name]).max()))
        assert np.abs(grad - ref_grads[name]).max() < 1e-5 * scale, name


def test_rotary_is_bitwise_paddlenlp_and_steps_aside_outside_the_plain_case(
    counted: dict[str, int],
) -> None:
    """``x @ R`` with a signed permutation is exact: outputs and gradients bitwise equal.
    No position ids, or autocast, and PaddleNLP's own function runs."""
    from paddlenlp.transformers.llama import modeling

    install_cpu_layers(tiny_model("llama"))
    cpu_layers._enter()  # as the forward of a model ftlab loaded does

    paddle.seed(3)
    q0, k0 = paddle.randn([2, 5, 4, 8]), paddle.randn([2, 5, 2, 8])
    table = paddle.randn([1, 16, 1, 8])
    cos, sin = table.cos(), table.sin()
    pos = paddle.to_tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])

    def run() -> list[np.ndarray]:
        q, k = q0.clone(), k0.clone()
        q.stop_gradient = k.stop_gradient = False
        qe, ke = modeling.apply_rotary_pos_emb(q, k, cos, sin, pos)
        ((qe * qe.detach()).sum() + (ke * ke.detach()).sum()).backward()
        return [qe.numpy(), ke.numpy(), q.grad.numpy(), k.grad.numpy()]

    use_fast_cpu_layers(False)
    ref = run()
    use_fast_cpu_layers(True)
    fast = run()
    assert counted["rotary"] == 1
    for a, b in zip(fast, ref, strict=True):
        assert np.array_equal(a, b)
    with paddle.amp.auto_cast(True, level="O1", dtype="bfloat16"):
        modeling.apply_rotary_pos_emb(q0, k0, cos, sin, pos)
    modeling.apply_rotary_pos_emb(q0, k0, cos, sin, None)
    assert counted["rotary"] == 1
    cpu_layers._leave()
    modeling.apply_rotary_pos_emb(q0, k0, cos, sin, pos)  # no ftlab model running
    assert counted["rotary"] == 1


def test_only_models_ftlab_loaded_take_the_fast_layers(counted: dict[str, int]) -> None:
    """A PaddleNLP model built beside an ftlab-loaded one keeps PaddleNLP's functions;
    installing twice changes nothing."""
    from paddlenlp.transformers.llama import modeling

    ours, theirs = tiny_model("llama"), tiny_model("llama")
    install_cpu_layers(ours)
    first = modeling.LlamaRMSNorm.forward
    assert install_cpu_layers(ours) == 5 and modeling.LlamaRMSNorm.forward is first
    ids = paddle.to_tensor([[5, 6, 7, 8]])
    with paddle.no_grad():
        theirs(input_ids=ids)
        assert counted == {"norm": 0, "rotary": 0}
        ours(input_ids=ids)
    assert counted == {"norm": 5, "rotary": 2}
    assert cpu_layers._running == 0
    # PaddleNLP's LoRA wrapper calls the wrapped model's forward past its hooks: the gate
    # sits on the attention layers, so a LoRA model takes the fast rotary too.
    from paddlenlp.peft import LoRAConfig, LoRAModel

    lora = LoRAModel(ours, LoRAConfig(target_modules=[".*q_proj.*"], r=2, lora_alpha=4))
    with paddle.no_grad():
        lora(input_ids=ids)
    assert counted == {"norm": 10, "rotary": 4}
    assert cpu_layers._running == 0
