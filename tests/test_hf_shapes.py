"""Every tensor of a Hugging Face checkpoint has the shape config.json implies: norms,
embeddings, heads, routers and biases as well as the linears. A contradiction is one line
naming the file and the tensor, before any training (PaddleNLP's loader would skip a
mismatched tensor with a warning and train on its random initialisation)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from helpers import compose_run, group_options, run_ftlab_forked

from ftlab.errors import ModelLoadError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from ftlab.interop import hf_in

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "ftlab-cache"))
    monkeypatch.setattr(hf_in, "_converted", {})
    return tmp_path / "ftlab-cache"


def reshape_tensor(d: Path, name: str, shape: list[int]) -> Path:
    """Give ``name`` another shape of the same element count, in its file's header only
    (the file stays a valid safetensors file)."""
    index = d / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.is_file() else None
    path = d / (file or "model.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert math.prod(header[name]["shape"]) == math.prod(shape)
    header[name]["shape"] = shape
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    return path


@pytest.mark.parametrize(
    ("fixture", "tensor", "shape"),
    [
        ("qwen2-tiny", "model.norm.weight", [2, 16]),  # final norm
        ("qwen2-tiny", "model.layers.1.input_layernorm.weight", [4, 8]),  # a layer's norm
        ("llama-tiny-sharded-fp16", "lm_head.weight", [32, 512]),  # untied head, transposed
        ("qwen2_moe-tiny-sharded-bf16", "model.layers.0.mlp.gate.weight", [32, 4]),  # router
        ("qwen2-tiny", "model.layers.0.self_attn.k_proj.bias", [2, 8]),  # a bias
        ("bloom-tiny", "transformer.word_embeddings_layernorm.bias", [4, 4]),
        ("opt-tiny", "model.decoder.embed_positions.weight", [65, 32]),
    ],
)
def test_a_tensor_whose_shape_contradicts_config_json_is_one_line(
    tmp_path: Path, fixture: str, tensor: str, shape: list[int]
) -> None:
    from ftlab.interop.hf_in import cache_root, paddle_dir

    d = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, d)
    path = reshape_tensor(d, tensor, shape)
    with pytest.raises(ModelLoadError) as err:
        paddle_dir(str(d), False)
    message = str(err.value)
    assert message.startswith(f"{path}: tensor {tensor!r} has shape {shape}, but config.json")
    assert "\n" not in message
    assert not list((cache_root() / "hf").glob("*"))  # nothing converted, nothing half-written


def test_every_converted_tensor_has_a_shape_from_config_json() -> None:
    """The expected shapes cover every tensor of every fixture (none left unchecked), and
    they are the converted tensors' shapes."""
    from safetensors import safe_open

    from ftlab.config.schema import ModelConfig
    from ftlab.interop.hf_in import paddle_dir
    from ftlab.models.arch import model_tensors, optional_tensors
    from ftlab.models.config_json import resolve_model

    for d in sorted(p for p in FIXTURES.iterdir() if (p / "expected.json").is_file()):
        if not list(d.glob("*.safetensors")):
            continue  # the pickled copy: the same tensors as mistral-tiny
        model = resolve_model(ModelConfig(name_or_path=str(d)))
        want = model_tensors(model) | optional_tensors(model)
        got = {}
        for f in Path(paddle_dir(str(d), False)).glob("*.safetensors"):
            with safe_open(f, "np") as st:
                got |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        prefix = model.family + "."
        got = {k if k in want else prefix + k: v for k, v in got.items()}
        assert got == {k: v for k, v in want.items() if k in got}, d.name
        # everything but OPT's head (PaddleNLP's OPT has one, the tied checkpoint does not)
        assert set(model_tensors(model)) - set(got) <= {"lm_head.decoder_weight"}, d.name


@pytest.mark.fast
@pytest.mark.parametrize("option", group_options("model"))
def test_tensor_list_adds_up_to_the_plans_parameter_count(option: str) -> None:
    """Every shipped model option: the named tensors sum to the plan's parameter count (the
    two are computed separately from the family row)."""
    from ftlab.models.arch import base_counts, model_tensors

    model = compose_run([f"model={option}"]).model
    tensors = model_tensors(model)
    fam_rotary = {k for k in tensors if k.endswith("inv_freq")}  # a buffer, not a parameter
    total = sum(math.prod(s) for k, s in tensors.items() if k not in fam_rotary)
    assert total == base_counts(model).total


def test_run_on_a_checkpoint_with_a_bad_norm_stops_before_training(tmp_path: Path) -> None:
    d = tmp_path / "qwen2-bad-norm"
    shutil.copytree(FIXTURES / "qwen2-tiny", d)
    path = reshape_tensor(d, "model.norm.weight", [2, 16])
    proc = run_ftlab_forked(tmp_path, f"model.name_or_path={d}", "data.max_length=128", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1 and f"{path}: tensor 'model.norm.weight' has shape" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "step " not in proc.stdout  # no training step ran
