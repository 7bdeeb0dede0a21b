"""Hugging Face checkpoints in: fixtures written by transformers itself (tests/fixtures/hf,
see make_fixtures.py), converted by ftlab into its cache and loaded by PaddleNLP.

Logits and token ids are compared with what transformers computed for the same
directory (stored next to the weights); no torch here.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from ftlab.config.schema import ModelConfig
from ftlab.errors import ModelLoadError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
LOGIT_TOL = 1e-4
# transformers' logits reproduced (max |diff| measured 2026-12-03: 6e-8 .. 9e-6; gemma, opt,
# deepseek_v2 and deepseek_v3 since the fixes tests/test_hf_families.py checks)
MATCHING = [
    "llama-stories260k-bf16",
    "llama-tiny-sharded-fp16",
    "qwen2-tiny",
    "qwen2_moe-tiny-sharded-bf16",
    "mistral-tiny",
    "mixtral-tiny",
    "bloom-tiny",
    "gemma-tiny",
    "opt-tiny",
    "deepseek_v2-tiny",
    "deepseek_v3-tiny",
]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    from ftlab.interop import hf_in

    root = tmp_path_factory.getbasetemp() / "ftlab-cache"
    monkeypatch.setenv("FTLAB_CACHE", str(root))
    monkeypatch.setattr(hf_in, "_converted", {})
    return root


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def expected(name: str) -> dict:
    return json.loads((FIXTURES / name / "expected.json").read_text())


def logits(model_dir: Path, ids: list) -> np.ndarray:
    import paddle

    from ftlab.models.loading import load_model, output_logits

    model = load_model(ModelConfig(name_or_path=str(model_dir)), "float32")
    model.eval()
    with paddle.no_grad():
        return output_logits(model(paddle.to_tensor(ids))).numpy()


@pytest.mark.parametrize("name", MATCHING)
def test_hf_checkpoint_gives_transformers_logits_and_is_not_written(name: str) -> None:
    d = FIXTURES / name
    before = snapshot(d)
    exp = expected(name)
    got = logits(d, exp["input_ids"])
    diff = float(np.abs(got - np.load(d / "expected_logits.npy")).max())
    assert diff <= LOGIT_TOL, diff
    assert snapshot(d) == before  # the user's directory: same files, same mtimes


@pytest.mark.parametrize(
    "name", ["llama-stories260k-bf16", "llama-tiny-sharded-fp16", "qwen2-tiny"]
)
def test_tokenizer_ids_and_chat_template_equal_transformers(name: str) -> None:
    from ftlab.models.loading import load_tokenizer

    exp = expected(name)
    tok = load_tokenizer(ModelConfig(name_or_path=str(FIXTURES / name), pad_token="<unk>"))
    assert [tok(t)["input_ids"] for t in exp["texts"]] == exp["tokens"]["fast"]
    text = tok.chat_template.render(messages=exp["chat"], **tok.special_tokens_map)
    assert text == exp["tokens"]["chat_text"]


def test_non_legacy_fast_and_legacy_slow_llama_differ_as_in_transformers() -> None:
    """The prefix-space rule is real: the same sentencepiece model gives other ids under
    legacy=false; ftlab follows each directory's own setting (asserted above)."""
    legacy = expected("llama-stories260k-bf16")["tokens"]["fast"]
    non_legacy = expected("llama-tiny-sharded-fp16")["tokens"]["fast"]
    assert legacy[0] != non_legacy[0]


def test_slow_bpe_tokenizer_from_vocab_and_merges(tmp_path: Path) -> None:
    from ftlab.models.loading import load_tokenizer

    d = tmp_path / "qwen2-slow"
    shutil.copytree(FIXTURES / "qwen2-tiny", d)
    (d / "tokenizer.json").unlink()
    exp = expected("qwen2-tiny")
    tok = load_tokenizer(ModelConfig(name_or_path=str(d)))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert [tok(t)["input_ids"] for t in exp["texts"]] == exp["tokens"]["slow"]


@pytest.mark.parametrize("name", MATCHING)
def test_names_and_shapes_match_paddlenlp_model_built_from_config_json(name: str) -> None:
    """Every family with a fixture: the converted tensors are exactly the parameters
    PaddleNLP's class builds from config.json (names and shapes)."""
    import paddlenlp.transformers as pt
    from paddlenlp.transformers import AutoConfig
    from safetensors import safe_open

    from ftlab.interop.hf_in import paddle_dir
    from ftlab.models.config_json import family_of, read_config_json

    d = FIXTURES / name
    entry = Path(paddle_dir(str(d), False))
    assert entry != d
    got = {}
    for f in sorted(entry.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            got.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    fam = family_of(read_config_json(d), d)
    model = getattr(pt, fam.causal_lm_class)(AutoConfig.from_pretrained(str(entry)))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the tied head is the embedding (Bloom's is named lm_head.decoder_weight)
    tied = {"lm_head.weight", "lm_head.decoder_weight"}
    tied = tied if read_config_json(d).get("tie_word_embeddings", True) else set()
    tied = set() if fam.tied_head_copy else tied  # OPT: the conversion writes the copy
    assert set(got) == set(want) - tied - {k for k in want if "rotary_emb" in k}
    assert {k: want[k] for k in got if k in want} == {k: v for k, v in got.items() if k in want}


def test_cache_entry_is_reused_and_recorded(tmp_path: Path, monkeypatch) -> None:
    from ftlab.interop import hf_in

    cache = tmp_path / "cache"
    monkeypatch.setenv("FTLAB_CACHE", str(cache))
    d = FIXTURES / "llama-tiny-sharded-fp16"
    first = Path(hf_in.paddle_dir(str(d), False))
    record = hf_in.conversion_records()[0]
    assert record["reused"] is False and first.parent == cache / "hf"
    assert record["source_files"]["model.safetensors.index.json"]["sha256"]
    assert len(record["source_files"]) >= 5  # config, 3 shards, index, tokenizer files
    assert record["name_mappings"].endswith("LlamaForCausalLM._get_name_mappings")
    stamp = snapshot(first)
    hf_in._converted.clear()
    assert Path(hf_in.paddle_dir(str(d), False)) == first
    assert hf_in.conversion_records()[0]["reused"] is True
    assert snapshot(first) == stamp


def test_half_written_cache_entry_is_never_used(tmp_path: Path, monkeypatch) -> None:
    from ftlab.interop import hf_in

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    d = FIXTURES / "qwen2-tiny"
    entry = Path(hf_in.paddle_dir(str(d), False))
    shutil.rmtree(entry)
    entry.mkdir()  # what a conversion killed mid-way could leave: files, no record
    (entry / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    hf_in._converted.clear()
    assert Path(hf_in.paddle_dir(str(d), False)) == entry
    assert hf_in.conversion_records()[0]["reused"] is False
    assert (entry / hf_in.RECORD_FILE).is_file()
    assert (entry / "model-00001-of-00001.safetensors").stat().st_size > 1000


def test_paddlenlp_layout_is_passed_through() -> None:
    from ftlab.assets import asset_path
    from ftlab.interop.hf_in import paddle_dir

    shipped = str(asset_path("stories260k"))
    assert paddle_dir(shipped, False) == shipped


# --------------------------------------------------------------------------- bad input


def _copy(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def _rename_tensor(path: Path, old: str, new: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[new] = header.pop(old)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def _missing_shard(d: Path) -> str:
    (d / "model-00002-of-00003.safetensors").unlink()
    return "model-00002-of-00003.safetensors"


def _missing_shard_no_index(d: Path) -> str:
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00003-of-00003.safetensors").unlink()
    return "shard model-00003-of-00003.safetensors is missing"


def _shape_contradicts_config(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    return "mlp.down_proj.weight' has shape [32, 48], but config.json implies [32, 64]"


def _unknown_tensor(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    old = "model.layers.1.mlp.up_proj.weight"
    path = d / index["weight_map"][old]
    _rename_tensor(path, old, "model.layers.1.mlp.up_proj_extra.weight")
    index["weight_map"]["model.layers.1.mlp.up_proj_extra.weight"] = index["weight_map"].pop(old)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return (
        "tensor 'model.layers.1.mlp.up_proj_extra.weight' is not a weight of PaddleNLP's "
        "LlamaForCausalLM"
    )


def _truncated(d: Path) -> str:
    path = d / "model-00003-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return "model-00003-of-00003.safetensors: not a complete safetensors file (tensor"


@pytest.mark.parametrize(
    "breaks",
    [
        _missing_shard,
        _missing_shard_no_index,
        _shape_contradicts_config,
        _unknown_tensor,
        _truncated,
    ],
)
def test_broken_checkpoint_is_one_line_naming_file_and_tensor(tmp_path: Path, breaks) -> None:
    from ftlab.interop.hf_in import cache_root, paddle_dir

    d = _copy(tmp_path, "llama-tiny-sharded-fp16")
    needle = breaks(d)
    with pytest.raises(ModelLoadError) as err:
        paddle_dir(str(d), False)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert not list((cache_root() / "hf").glob(".tmp-*"))  # nothing half-written left


def test_pickled_weights_only_are_refused_unless_allowed(tmp_path: Path) -> None:
    from ftlab.interop.hf_in import paddle_dir

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(FIXTURES / "llama-stories260k-bf16" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: a pickle.*allow_pickle=true"):
        paddle_dir(str(d), False)
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: not a readable PyTorch"):
        paddle_dir(str(d), True)
    (d / "pytorch_model.bin").unlink()
    (d / "model_state.pdparams").write_bytes(b"\x80\x02not really")
    with pytest.raises(ModelLoadError, match=r"model_state.pdparams: a pickle"):
        paddle_dir(str(d), False)


def test_pickled_hf_checkpoint_with_allow_pickle_gives_transformers_logits() -> None:
    import paddle

    from ftlab.interop import hf_in
    from ftlab.models.loading import load_model, output_logits

    d = FIXTURES / "mistral-tiny-pickle"
    before = snapshot(d)
    model = load_model(ModelConfig(name_or_path=str(d), allow_pickle=True), "float32")
    model.eval()
    with paddle.no_grad():
        got = output_logits(model(paddle.to_tensor(expected("mistral-tiny")["input_ids"])))
    diff = float(np.abs(got.numpy() - np.load(d / "expected_logits.npy")).max())
    assert diff <= LOGIT_TOL, diff
    (record,) = hf_in.conversion_records()
    assert list(record["pickled_source"]["pickles"]) == ["pytorch_model.bin"]
    assert snapshot(d) == before


def test_hub_name_is_taken_from_the_local_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``org/name`` with a snapshot in the Hugging Face cache (its layout: refs/main names
    the snapshot) is converted from there, with no network."""
    from ftlab.interop.hf_in import paddle_dir

    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--qwen2-tiny"
    shutil.copytree(FIXTURES / "qwen2-tiny", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    entry = Path(paddle_dir("tiny-org/qwen2-tiny", False))
    assert (entry / "ftlab_hf_conversion.json").is_file()
    assert paddle_dir("tiny-org/not-cached", False) == "tiny-org/not-cached"
