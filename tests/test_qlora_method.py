"""QLoRA as an ftlab method: quantize-while-loading, adapter save/reload, merge."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers import compose_run

from ftlab.methods.catalog import get_method


@pytest.fixture(scope="module")
def setup():
    run = compose_run(["method=qlora"])
    return run, get_method("qlora")


def _logits(model, ids: paddle.Tensor) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        out = model(ids)
    return (out[0] if isinstance(out, tuple) else out.logits).numpy()


def _trained_qlora(run, method):
    paddle.seed(0)
    model = method.apply(
        method.load_base(run.method, run.model, dtype="float32"), run.method, run.model
    )
    # Make the adapter non-trivial: LoRA B starts at zero.
    for _name, p in model.named_parameters():
        if not p.stop_gradient:
            p.set_value(paddle.randn(p.shape, dtype=p.dtype) * 0.05)
    return model


def test_load_base_quantizes_every_target_linear(setup) -> None:
    run, method = setup
    from ftlab.models.quant.qlinear import QuantLoRALinear

    model = method.load_base(run.method, run.model, dtype="float32")
    quantized = [m for m in model.sublayers() if isinstance(m, QuantLoRALinear)]
    assert len(quantized) == 35
    assert all(p.stop_gradient for n, p in model.named_parameters() if "lora" not in n)


def test_adapter_reloads_onto_a_fresh_float_base(setup, tmp_path: Path, request) -> None:
    run, method = setup
    from ftlab.models.loading import load_model

    model = _trained_qlora(run, method)
    ids = paddle.to_tensor([[1, 403, 407, 261, 378, 2]])
    expected = _logits(model, ids)
    method.save_final(None, model, tmp_path)
    request.getfixturevalue("no_unpickling")  # reloading reads no pickle
    reloaded = method.load(load_model(run.model, "float32"), tmp_path)
    assert np.abs(_logits(reloaded, ids) - expected).max() <= 1e-5


def test_merge_equals_adapter_model(setup) -> None:
    run, method = setup
    model = _trained_qlora(run, method)
    ids = paddle.to_tensor([[1, 403, 407, 261, 378, 2]])
    expected = _logits(model, ids)
    merged = method.merge(model)
    from ftlab.models.quant.qlinear import QuantLoRALinear

    assert not any(isinstance(m, QuantLoRALinear) for m in merged.sublayers())
    assert np.abs(_logits(merged, ids) - expected).max() <= 1e-4


def test_paddlenlp_backend_on_cpu_fails_naming_the_alternative(setup) -> None:
    from helpers import CPU

    from ftlab.errors import ConfigError
    from ftlab.resolve.validate import validate

    run = compose_run(["method=qlora", "method.quant_backend=paddlenlp"])
    with pytest.raises(
        ConfigError,
        match="quant_backend=paddlenlp.*use method.quant_backend=ftlab"
        "|quant_backend=paddlenlp.*Use method.quant_backend=ftlab",
    ):
        validate(run, CPU)


def test_unsupported_variant_is_refused(setup) -> None:
    from helpers import CPU

    from ftlab.errors import ConfigError
    from ftlab.resolve.validate import validate

    with pytest.raises(ConfigError, match="method=qlora does not support use_mora"):
        validate(compose_run(["method=qlora", "method.use_mora=true"]), CPU)


@pytest.mark.parametrize(
    "backend,env,message",
    [
        ("ftlab", "gpu_slim", "quant_backend=ftlab was chosen"),
        ("auto", "gpu_no_slim", "quant_backend=auto resolves to ftlab's backend here"),
    ],
)
def test_tensor_parallel_qlora_needs_the_paddlenlp_backend(
    backend: str, env: str, message: str
) -> None:
    from helpers import GPU8

    from ftlab.errors import ConfigError
    from ftlab.resolve.validate import validate

    envs = {
        "gpu_slim": dataclasses.replace(GPU8, paddleslim_ops=True),
        "gpu_no_slim": GPU8,
    }
    run = compose_run(["method=qlora", f"method.quant_backend={backend}", "parallel=tp4"])
    with pytest.raises(ConfigError, match=f"parallel=tp4: {message}.*no tensor-parallel form"):
        validate(run, envs[env])


@pytest.mark.parametrize("backend", ["auto", "paddlenlp"])
def test_tensor_parallel_qlora_validates_where_paddlenlp_kernels_run(backend: str) -> None:
    """Tensor-parallel QLoRA on a GPU machine with PaddleSlim (an injected environment)."""
    from helpers import GPU8

    from ftlab.resolve.validate import validate

    run = compose_run(
        ["method=qlora", f"method.quant_backend={backend}", "parallel=tp4", "model=llama3"]
    )
    derived = validate(run, dataclasses.replace(GPU8, paddleslim_ops=True))
    assert derived["quant_backend"] == "paddlenlp" and derived["world_size"] == 4
