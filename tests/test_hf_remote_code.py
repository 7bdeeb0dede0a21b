"""Qwen (v1) and ChatGLM2 checkpoints in their Hugging Face repositories' layout (remote
code: transformers cannot build them here, so the fixtures are written by
``tests/fixtures/hf/make_remote_code_fixtures.py`` with the names, ``[out, in]`` shapes and
config.json keys of ``modeling_qwen.py`` / ``modeling_chatglm.py``; no transformers logits
to compare). ftlab detects the layout, converts every tensor (none unknown, none missing,
every shape checked), and PaddleNLP's class loads exactly the converted weights and runs a
forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_run

from ftlab.config.schema import ModelConfig
from ftlab.errors import ModelLoadError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HF = FIXTURES / "hf"
REMOTE = [
    ("qwen-tiny", "qwen", "QWenForCausalLM"),
    ("chatglm2-tiny", "chatglm_v2", "ChatGLMv2ForCausalLM"),
]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from ftlab.interop import hf_in

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "ftlab-cache"))
    monkeypatch.setattr(hf_in, "_converted", {})
    return tmp_path / "ftlab-cache"


def tensors(d: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.mark.parametrize(("name", "family", "cls"), REMOTE)
def test_remote_code_checkpoint_converts_every_tensor_and_paddlenlp_runs_it(
    name: str, family: str, cls: str
) -> None:
    import paddle

    from ftlab.interop.hf_in import conversion_records, paddle_dir
    from ftlab.interop.hf_layout import detect
    from ftlab.models.arch import model_tensors
    from ftlab.models.config_json import resolve_model
    from ftlab.models.families import family as family_row
    from ftlab.models.loading import load_model, output_logits

    d = HF / name
    stamp = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    model_cfg = resolve_model(ModelConfig(name_or_path=str(d)))
    assert model_cfg.family == family
    assert detect(d, family_row(family).base_prefix, False) is not None  # Hugging Face layout

    entry = Path(paddle_dir(str(d), False))
    (record,) = conversion_records()
    source, converted = tensors(d), tensors(entry)
    counts = record["tensors"]
    assert record["dropped"] == [] and counts["transposed"] + counts["kept"] == len(source)
    assert len(converted) == len(source)
    # every converted tensor has the shape config.json implies (PaddleNLP's names)
    assert {k: v.shape for k, v in converted.items()} == model_tensors(model_cfg)
    # and holds a source tensor's values, as they were or transposed ([out, in] -> [in, out])
    for k, v in source.items():
        assert any(
            (c.shape == v.shape and np.array_equal(c, v))
            or (v.ndim == 2 and c.shape == v.T.shape and np.array_equal(c, v.T))
            for c in converted.values()
        ), k
    assert record["name_mappings"] == f"paddlenlp.transformers.{cls}._get_name_mappings"

    model = load_model(ModelConfig(name_or_path=str(d)), "float32")
    assert type(model).__name__ == cls
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(state) == set(converted)  # nothing PaddleNLP builds is left random
    for k, v in converted.items():
        assert np.array_equal(state[k], v), k
    model.eval()
    ids = json.loads((d / "expected.json").read_text())["input_ids"]
    with paddle.no_grad():
        logits = output_logits(model(paddle.to_tensor(ids))).numpy()
    assert logits.shape == (2, 8, model_cfg.arch.vocab_size) and np.isfinite(logits).all()
    assert float(np.abs(logits).max()) > 0
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamp  # only read


@pytest.mark.fast
def test_hugging_face_chatglm2_config_composes_as_chatglm_v2(tmp_path: Path) -> None:
    """chatglm2-6b's own config.json (model_type "chatglm") is read as family chatglm_v2,
    with the numbers of the shipped model=chatglm2_6b option."""
    d = tmp_path / "chatglm2-6b"
    d.mkdir()
    shutil.copy(FIXTURES / "model_configs" / "chatglm2_6b.json", d / "config.json")
    run = compose_run([f"model.name_or_path={d}"])
    assert run.model.family == "chatglm_v2"
    assert run.model.arch == compose_run(["model=chatglm2_6b"]).model.arch


def test_hugging_face_chatglm2_config_without_its_weights_is_refused(tmp_path: Path) -> None:
    """The config beside weights in PaddleNLP's layout (or none) would make PaddleNLP build
    ChatGLM v1: one line, before loading."""
    from ftlab.interop.hf_in import paddle_dir

    d = tmp_path / "glm"
    d.mkdir()
    shutil.copy(HF / "chatglm2-tiny" / "config.json", d)
    with pytest.raises(ModelLoadError, match=r"a Hugging Face chatglm_v2 config.json") as err:
        paddle_dir(str(d), False)
    assert "\n" not in str(err.value)


def test_qwen_tiktoken_tokenizer_is_staged_for_paddlenlp() -> None:
    """Qwen-7B's tokenizer (``qwen.tiktoken`` + ``tokenizer_class: QWenTokenizer``) goes
    into the converted copy, where PaddleNLP's QWenTokenizer reads it: bytes encode to their
    ranks, the special tokens follow the ranks. (No transformers ids to compare: remote
    code.)"""
    from paddlenlp.transformers import AutoTokenizer

    from ftlab.interop.hf_in import conversion_records, paddle_dir

    entry = paddle_dir(str(HF / "qwen-tiny"), False)
    tok = AutoTokenizer.from_pretrained(entry)
    assert type(tok).__name__ == "QWenTokenizer"
    assert tok("hello world", add_special_tokens=False)["input_ids"] == list(b"hello world")
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 256
    (record,) = conversion_records()
    assert "qwen.tiktoken" in record["source_files"]
