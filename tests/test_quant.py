"""Tests of ftlab.quant: codebooks, blockwise round trips, the QLoRA layer and model helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ftlab.models.quant.backend import native_backend_available
from ftlab.models.quant.blockwise import (
    FP4_CODEBOOK,
    NF4_CODEBOOK,
    codebook,
    dequantize,
    pack_4bit,
    quantize,
    unpack_4bit,
)
from ftlab.models.quant.loading import SafetensorsSource, quantize_while_loading
from ftlab.models.quant.qlinear import (
    QLoRASpec,
    QuantLoRALinear,
    dequantize_and_merge,
    load_lora_state_dict,
    lora_state_dict,
    quant_config,
    quantize_model,
)

PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823029,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

LLAMA_TARGETS = [".*q_proj", ".*k_proj", ".*v_proj", ".*o_proj", ".*gate_proj", ".*up_proj"]
LLAMA_TARGETS += [".*down_proj"]


def _gaussian(shape: list[int], seed: int = 0) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal(shape).astype("float32"))


def _mse(a: paddle.Tensor, b: paddle.Tensor) -> float:
    return float(((a - b) ** 2).mean())


# --------------------------------------------------------------------------- codebooks


def test_nf4_codebook_equals_paper_values() -> None:
    np.testing.assert_allclose(NF4_CODEBOOK, PAPER_NF4, rtol=0, atol=1e-7)
    np.testing.assert_allclose(codebook("nf4").numpy(), PAPER_NF4, rtol=0, atol=1e-7)


def test_fp4_codebook_is_bnb_e2m1_normalised() -> None:
    mags = [0.0625 / 12, 2 / 12, 3 / 12, 4 / 12, 6 / 12, 8 / 12, 1.0]
    expected = [-m for m in reversed(mags)] + [0.0] + mags
    np.testing.assert_allclose(FP4_CODEBOOK, expected, rtol=0, atol=1e-7)
    assert max(abs(v) for v in FP4_CODEBOOK) == 1.0


def test_unknown_algo_names_the_setting() -> None:
    with pytest.raises(ValueError, match="quant_algo='nf3'"):
        quantize(_gaussian([4, 64]), "nf3")
    with pytest.raises(ValueError, match="quant_block_size"):
        quantize(_gaussian([4, 64]), "nf4", block_size=63)


# --------------------------------------------------------------------------- round trips


def test_nf4_has_lower_error_than_int4_on_gaussian_weights() -> None:
    w = _gaussian([256, 512])
    err_nf4 = _mse(dequantize(quantize(w, "nf4", 64)), w)
    err_int4 = _mse(dequantize(quantize(w, "int4", 64)), w)
    assert err_nf4 < err_int4
    # Sanity on magnitude: a 4-bit code of unit Gaussians is off by ~0.1 rms, not ~1.
    assert 1e-3 < err_nf4 < 2e-2


def test_int8_error_is_at_most_half_a_step_per_block() -> None:
    block = 64
    w = _gaussian([96, 130], seed=1)  # 12480 values: not a multiple of 64, last block padded
    deq = dequantize(quantize(w, "int8", block)).numpy().reshape(-1)
    flat = w.numpy().reshape(-1)
    pad = (-flat.size) % block
    err = np.abs(np.pad(deq - flat, (0, pad))).reshape(-1, block).max(axis=1)
    step = np.abs(np.pad(flat, (0, pad))).reshape(-1, block).max(axis=1) / 127.0
    # fp32 arithmetic may add a few ulps over the exact half step.
    assert np.all(err <= step / 2 * (1 + 1e-5))
    assert err.max() > step.max() / 8  # it is rounding, not exact


def test_dequantize_restores_shape_and_zero_blocks_are_exact() -> None:
    w = _gaussian([7, 9], seed=2)  # 63 values: one padded block
    w[0:3] = 0.0
    for algo in ("nf4", "fp4", "int8", "int4"):
        out = dequantize(quantize(w, algo, 32))
        assert list(out.shape) == [7, 9]
        assert float(out[0:3].abs().max()) == 0.0
    assert dequantize(quantize(w, "nf4"), "bfloat16").dtype == paddle.bfloat16


def test_4bit_packing_round_trips_exactly() -> None:
    codes = paddle.to_tensor(np.random.default_rng(3).integers(0, 16, 1001), dtype="int32")
    packed = pack_4bit(codes)
    assert packed.dtype == paddle.uint8
    assert packed.shape == [501]
    np.testing.assert_array_equal(unpack_4bit(packed, 1001).numpy(), codes.numpy())
    # First code in the high nibble.
    assert int(pack_4bit(paddle.to_tensor([3, 10]))[0]) == 3 * 16 + 10


def test_quantized_codes_are_nearest_codebook_entries() -> None:
    w = _gaussian([4, 64], seed=4)
    qt = quantize(w, "nf4", 64)
    normalized = w.reshape([-1, 64]) / w.reshape([-1, 64]).abs().max(axis=1, keepdim=True)
    idx = unpack_4bit(qt.codes, 256).numpy()
    cb = np.asarray(PAPER_NF4)
    nearest = np.abs(normalized.numpy().reshape(-1, 1) - cb[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(idx, nearest)


def test_double_quant_shrinks_scales_and_keeps_error() -> None:
    w = _gaussian([512, 512], seed=5)  # 4096 blocks of 64 -> 16 scale blocks of 256
    plain = quantize(w, "nf4", 64)
    dq = quantize(w, "nf4", 64, double_quant=True)
    assert plain.scale_nbytes() == 4096 * 4
    assert dq.scale_nbytes() == 4096 * 1 + 16 * 4 + 4
    assert plain.codes.shape == dq.codes.shape == [512 * 512 // 2]
    err_plain = _mse(dequantize(plain), w)
    err_dq = _mse(dequantize(dq), w)
    assert abs(err_dq - err_plain) / err_plain < 0.01
    assert float((dq.block_absmax() - plain.absmax).abs().max()) < 0.01


# --------------------------------------------------------------------------- layer


def _qlayer(
    spec: QLoRASpec, bias: bool = True, seed: int = 0, shape: tuple[int, int] = (64, 96)
) -> QuantLoRALinear:
    paddle.seed(seed)
    linear = paddle.nn.Linear(*shape, bias_attr=None if bias else False)
    if bias:
        linear.bias.set_value(_gaussian([shape[1]], seed=seed + 1) * 0.1)
    layer = QuantLoRALinear.from_linear(linear, spec)
    # Non-zero B so the LoRA path is exercised.
    layer.lora_B.set_value(_gaussian([spec.lora_rank, shape[1]], seed=seed + 2) * 0.05)
    return layer


@pytest.mark.parametrize("algo,double_quant,rslora", [("nf4", False, False), ("int8", True, True)])
def test_forward_matches_dequantized_linear_plus_lora(
    algo: str, double_quant: bool, rslora: bool
) -> None:
    spec = QLoRASpec(
        algo=algo, double_quant=double_quant, lora_rank=4, lora_alpha=8.0, rslora=rslora
    )
    layer = _qlayer(spec)
    x = _gaussian([2, 5, 64], seed=9)
    scaling = 8.0 / 2.0 if rslora else 8.0 / 4
    assert layer.scaling == scaling
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    expected = expected + paddle.matmul(paddle.matmul(x, layer.lora_A), layer.lora_B) * scaling
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU-only error")
def test_half_compute_dtype_on_cpu_is_a_clear_error() -> None:
    layer = _qlayer(QLoRASpec(lora_rank=4, compute_dtype="bfloat16"))
    with pytest.raises(RuntimeError, match="compute_dtype=bfloat16 needs a GPU"):
        layer(_gaussian([2, 64]))


def test_frozen_base_holds_no_float_weight() -> None:
    layer = _qlayer(QLoRASpec(lora_rank=4))
    params = dict(layer.named_parameters())
    assert sorted(params) == ["bias", "lora_A", "lora_B"]
    assert [list(p.shape) for p in params.values()] == [[96], [64, 4], [4, 96]]
    buffers = dict(layer.named_buffers())
    assert sorted(buffers) == ["quant_absmax", "quant_codes"]
    assert buffers["quant_codes"].dtype == paddle.uint8
    assert buffers["quant_codes"].shape == [64 * 96 // 2]
    assert "quant_codes" in layer.state_dict()


def test_gradients_flow_only_into_lora() -> None:
    layer = _qlayer(QLoRASpec(lora_rank=4, lora_alpha=8.0))
    x = _gaussian([3, 64], seed=7)
    x.stop_gradient = False
    layer(x).square().sum().backward()
    assert layer.lora_A.grad is not None and float(layer.lora_A.grad.abs().sum()) > 0
    assert layer.lora_B.grad is not None and float(layer.lora_B.grad.abs().sum()) > 0
    assert layer.bias.grad is None
    assert all(b.grad is None for b in layer.buffers())
    # The input gradient goes through the re-decoded weight in the custom backward.
    x_ref = x.detach()
    x_ref.stop_gradient = False
    w = layer.dequantized_weight()
    lora = paddle.matmul(paddle.matmul(x_ref, layer.lora_A.detach()), layer.lora_B.detach())
    (F.linear(x_ref, w, layer.bias) + lora * layer.scaling).square().sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_merge_matches_quantized_adapter() -> None:
    spec = QLoRASpec(algo="nf4", double_quant=True, lora_rank=4, lora_alpha=8.0)
    model = paddle.nn.Sequential(
        _qlayer(spec), paddle.nn.ReLU(), _qlayer(spec, bias=False, seed=5, shape=(96, 32))
    )
    model.eval()
    x = _gaussian([4, 64], seed=11)
    before = model(x).numpy()
    dequantize_and_merge(model)
    assert type(model[0]) is paddle.nn.Linear and type(model[2]) is paddle.nn.Linear
    assert list(model[0].weight.shape) == [64, 96] and model[2].bias is None
    np.testing.assert_allclose(model(x).numpy(), before, rtol=0, atol=1e-5)


def test_spec_validation_and_json() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        QLoRASpec(lora_rank=0)
    with pytest.raises(ValueError, match="compute dtype|dtype"):
        QLoRASpec(compute_dtype="int8")
    spec = QLoRASpec(algo="int4", block_size=128, rslora=True)
    assert QLoRASpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="unknown QLoRA spec keys"):
        QLoRASpec.from_dict({"algo": "nf4", "bits": 4})


def test_native_backend_probe_explains_itself() -> None:
    ok, reason = native_backend_available("nf4")
    assert isinstance(ok, bool) and reason
    if not paddle.is_compiled_with_cuda():
        assert ok is False
        assert "CPU build" in reason and "quant_backend=ftlab" in reason


# --------------------------------------------------------------------------- tiny Llama


def _tiny_llama(lazy: bool = False) -> paddle.nn.Layer:
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM
    from paddlenlp.transformers.model_utils import no_init_weights

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    if lazy:
        with no_init_weights(True), paddle.LazyGuard():
            return LlamaForCausalLM(config)
    paddle.seed(123)
    return LlamaForCausalLM(config)


def _batch() -> tuple[paddle.Tensor, paddle.Tensor]:
    seq = paddle.to_tensor(np.random.default_rng(0).integers(0, 128, (4, 17)), dtype="int64")
    return seq[:, :-1], seq[:, 1:]


def _expected_targets() -> list[str]:
    names = []
    for i in range(2):
        names += [f"llama.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        names += [f"llama.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return sorted(names)


def test_quantize_model_on_tiny_llama_trains() -> None:
    model = _tiny_llama()
    spec = QLoRASpec(algo="nf4", lora_rank=4, lora_alpha=8.0)
    report = quantize_model(model, LLAMA_TARGETS, spec)
    assert sorted(report.replaced) == _expected_targets()
    assert report.layers_replaced == 14
    # 2 layers x (4 * 64*64 + 3 * 64*128) fp32 weights.
    assert report.base_bytes_before == 2 * (4 * 64 * 64 + 3 * 64 * 128) * 4
    assert report.base_ratio < 0.16
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert len(trainable) == 28 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not any(type(m) is paddle.nn.Linear for _, m in model.named_sublayers() if "layers" in _)

    inputs, labels = _batch()
    opt = paddle.optimizer.AdamW(
        learning_rate=1e-2, parameters=[p for p in model.parameters() if not p.stop_gradient]
    )
    losses = []
    for _ in range(6):
        loss = model(input_ids=inputs, labels=labels)[0]
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses

    state = lora_state_dict(model)
    assert len(state) == 28
    assert "llama.layers.0.self_attn.q_proj.lora_A" in state
    cfg = quant_config(model)
    assert json.loads(json.dumps(cfg))["algo"] == "nf4"
    assert sorted(cfg["quantized_layers"]) == _expected_targets()


def test_quantize_while_loading_matches_quantize_model(tmp_path: Path) -> None:
    from safetensors.paddle import save_file

    ref = _tiny_llama()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    spec = QLoRASpec(algo="nf4", double_quant=True, lora_rank=4, lora_alpha=8.0)
    quantize_model(ref, LLAMA_TARGETS, spec)

    lazy = _tiny_llama(lazy=True)
    with SafetensorsSource(tmp_path) as source:
        report = quantize_while_loading(lazy, source, LLAMA_TARGETS, spec)
    assert sorted(report.replaced) == _expected_targets()
    inputs, _ = _batch()
    ref.eval()
    lazy.eval()
    # B starts at zero, so both adapted models equal their (identical) quantized bases.
    np.testing.assert_allclose(
        lazy(input_ids=inputs)[0].numpy(), ref(input_ids=inputs)[0].numpy(), rtol=0, atol=1e-5
    )

    # An adapter saved from one model loads into the other.
    for p in lora_state_dict(ref).values():
        p.set_value(paddle.randn(p.shape) * 0.01)
    load_lora_state_dict(lazy, {k: v.detach() for k, v in lora_state_dict(ref).items()})
    np.testing.assert_allclose(
        lazy(input_ids=inputs)[0].numpy(), ref(input_ids=inputs)[0].numpy(), rtol=0, atol=1e-5
    )


def test_loading_rejects_a_transposed_weight(tmp_path: Path) -> None:
    from safetensors.paddle import save_file

    state = {k: v.contiguous() for k, v in _tiny_llama().state_dict().items()}
    key = "llama.layers.0.mlp.up_proj.weight"
    state[key] = state[key].T.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with (
        SafetensorsSource(tmp_path / "model.safetensors") as source,
        pytest.raises(ValueError, match="PyTorch-layout"),
    ):
        quantize_while_loading(_tiny_llama(lazy=True), source, LLAMA_TARGETS, QLoRASpec())


def test_target_patterns_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="match no nn.Linear"):
        quantize_model(_tiny_llama(), [".*query"], QLoRASpec())
