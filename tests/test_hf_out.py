"""Hugging Face out: a run trained on a Hugging Face checkpoint (the transformers-written
stories260K fixture) is exported with ``ftlab-merge --format hf``; the export is read back
(here through ftlab's own Hugging Face reader, with ``make test-hf`` by transformers)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import run_ftlab_forked, run_in_process
from test_e2e import FTLAB

from ftlab.config.schema import ModelConfig
from ftlab.errors import ConfigError
from ftlab.interop.hf_layout import read_header
from ftlab.record.provenance import sha256_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hf" / "llama-stories260k-bf16"
IDS = [[1, 17, 42, 99, 7, 250, 3, 11], [1, 400, 2, 5, 61, 300, 12, 8]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ftlab-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftlab.interop import hf_in

    monkeypatch.setenv("FTLAB_CACHE", str(cache))
    monkeypatch.setattr(hf_in, "_converted", {})


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    import os

    cwd = tmp_path_factory.mktemp("cwd")
    os.environ["FTLAB_CACHE"] = str(cache)  # the subprocess's cache
    try:
        run_ftlab_forked(
            cwd,
            f"model.name_or_path={FIXTURE}",
            "model.pad_token='<unk>'",
            "train.max_steps=3",
            "eval.max_new_tokens=4",
        )
    finally:
        os.environ.pop("FTLAB_CACHE", None)
    (run,) = (cwd / "outputs").glob("*/*_llama-stories260k-bf16_lora")
    return run


def merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FTLAB.with_name("ftlab-merge")), *args], capture_output=True, text=True, timeout=300
    )


def logits(model_dir: Path) -> np.ndarray:
    import paddle

    from ftlab.models.loading import load_model, output_logits

    model = load_model(ModelConfig(name_or_path=str(model_dir)), "float32")
    model.eval()
    with paddle.no_grad():
        return output_logits(model(paddle.to_tensor(IDS))).numpy()


def test_run_on_hf_checkpoint_records_source_hashes(hf_run: Path) -> None:
    (conversion,) = json.loads((hf_run / "model_source.json").read_text())["hf_conversions"]
    assert conversion["source"] == str(FIXTURE)
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert conversion["source_files"][name]["sha256"] == sha256_file(FIXTURE / name)
    assert conversion["name_mappings"].endswith("LlamaForCausalLM._get_name_mappings")


def test_export_is_hf_layout_and_reads_back_as_the_merged_model(
    hf_run: Path, tmp_path: Path
) -> None:
    out, plain = tmp_path / "hf", tmp_path / "paddle"
    proc = merge(str(hf_run), "--format", "hf", "--out", str(out), "--max-shard-size", "400KB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The plain merge, the reference: ftlab-merge's main in this process.
    assert run_in_process("ftlab-merge", str(hf_run), "--out", str(plain)) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3  # 1.04 MB of float32 in shards of at most 400 kB
    for shard in shards:
        metadata, tensors = read_header(out / shard)
        assert metadata == {"format": "pt"}
        assert all(t.dtype == "F32" for t in tensors.values())
    names = set(index["weight_map"])
    assert "lm_head.weight" not in names  # tied: transformers leaves it out
    assert names == set(read_header(FIXTURE / "model.safetensors")[1])  # HF's own names
    _, tensors = read_header(out / index["weight_map"]["model.layers.0.mlp.down_proj.weight"])
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)  # [out, in]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (out / "tokenizer.model").read_bytes() == (FIXTURE / "tokenizer.model").read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert not any(str(v).startswith("/") for v in tok_config.values())  # no run-dir paths
    diff = float(np.abs(logits(out) - logits(plain)).max())
    assert diff <= 1e-5, diff  # measured 2026-12-03: ~1e-6


def test_export_in_bfloat16(hf_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    code = run_in_process(
        "ftlab-merge", str(hf_run), "--format", "hf", "--out", str(out), "--dtype", "bfloat16"
    )
    assert code == 0
    metadata, tensors = read_header(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_refuses_existing_or_in_run_dir_before_loading(hf_run: Path) -> None:
    inside = merge(str(hf_run), "--format", "hf", "--out", str(hf_run / "export"))
    assert inside.returncode == 2 and "inside the run directory" in inside.stderr
    existing = merge(str(hf_run), "--format", "hf", "--out", str(hf_run.parent))
    assert existing.returncode == 2 and "exists; give a new directory" in existing.stderr
    no_out = merge(str(hf_run), "--format", "hf")
    assert no_out.returncode == 2 and "--format hf needs --out" in no_out.stderr


@pytest.mark.parametrize("family", ["qwen", "chatglm_v2"])
def test_remote_code_families_are_refused_by_name(family: str) -> None:
    from ftlab.interop.hf_out import check_family

    with pytest.raises(ConfigError, match=f"family {family} cannot be written for transformers"):
        check_family(family)


def test_named_chat_template_as_jinja_renders_what_ftlab_trains_on() -> None:
    from jinja2 import Template

    from ftlab.data.formats import Conversation, Turn
    from ftlab.data.templates import NAMED_TEMPLATES
    from ftlab.interop.hf_tokenizer import jinja_of

    for name, named in NAMED_TEMPLATES.items():
        if named.user_input is not None:
            continue  # Alpaca's input field has no chat-message equivalent
        conv = Conversation(
            system="Be brief.", turns=(Turn(user="Hi", assistant="Hello"), Turn("More", "Sure"))
        )
        trained = "".join(p.text for p in named.pieces(conv))
        bos = "<s>" if named.add_bos else ""
        eos = "</s>" if named.eos_after_target else ""
        messages = [{"role": "system", "content": "Be brief."}]
        messages += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        messages += [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure"}]
        rendered = Template(jinja_of(named)).render(
            messages=messages, bos_token="<s>", eos_token="</s>"
        )
        if eos:
            trained = trained.replace("Hello", "Hello" + eos).replace("Sure", "Sure" + eos)
        assert rendered == bos + trained, name


def test_peft_adapter_has_peft_names_and_shapes(hf_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "peft"
    assert run_in_process("ftlab-merge", str(hf_run), "--format", "hf-peft", "--out", str(out)) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert adapter["base_model_name_or_path"] == str(FIXTURE)
    _, tensors = read_header(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (8, 172) and b.shape == (64, 8)  # PEFT: A [r, in], B [out, r]
    assert len(tensors) == 70  # 5 layers x 7 linears x (A, B)


@pytest.mark.parametrize("method", ["prefix", "reft", "vera", "lokr", "full"])
def test_peft_refuses_methods_it_cannot_express_by_name(method: str) -> None:
    from ftlab.interop.hf_out import check_peft_method

    with pytest.raises(ConfigError, match=f"a {method} adapter cannot be written as a PEFT"):
        check_peft_method(method)


def test_peft_refuses_lora_variants(tmp_path: Path) -> None:
    from ftlab.interop.hf_out import export_peft

    final = tmp_path / "final"
    final.mkdir()
    (final / "lora_config.json").write_text(json.dumps({"r": 8, "lora_use_mixer": True}))
    with pytest.raises(ConfigError, match="lora_use_mixer .MoSLoRA"):
        export_peft(final, tmp_path / "out", str(FIXTURE), {})


FIXTURES = FIXTURE.parent
# written by transformers (the remote-code families' fixtures are not, and --format hf
# refuses those families by name: test_remote_code_families_are_refused_by_name)
ALL_FIXTURES = sorted(
    p.name
    for p in FIXTURES.iterdir()
    if (p / "expected_logits.npy").is_file() and "pickle" not in p.name
)


def export_fixture(name: str, out: Path, dtype: str) -> None:
    """A Hugging Face fixture, loaded by ftlab and exported again (no training)."""
    from ftlab.interop.hf_in import base_config_json, paddle_dir
    from ftlab.interop.hf_out import export_hf
    from ftlab.models.families import FAMILIES
    from ftlab.models.loading import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(FIXTURES / name), pad_token="<unk>")
    model = load_model(cfg, "float32")
    tokenizer = (
        load_tokenizer(cfg) if (FIXTURES / name / "tokenizer_config.json").is_file() else None
    )
    family = FAMILIES[model.config.model_type]
    export_hf(
        model,
        tokenizer,
        out=out,
        family=family,
        base_config=base_config_json(str(FIXTURES / name)),
        tokenizer_dir=Path(paddle_dir(str(FIXTURES / name), False)),
        chat_template=None,
        dtype=dtype,
        max_shard_bytes=10**9,
        record={},
    )


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_hf_in_then_out_gives_back_transformers_tensors_exactly(name: str, tmp_path: Path) -> None:
    """Every family with a fixture: in (HF -> PaddleNLP) and out (PaddleNLP -> HF) are exact
    inverses: the export holds transformers' own tensors, names, shapes and values."""

    src = FIXTURES / name
    (src_dtype,) = {t.dtype for f in src.glob("*.safetensors") for t in read_header(f)[1].values()}
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[src_dtype]
    out = tmp_path / "hf"
    export_fixture(name, out, dtype)

    def tensors(d: Path) -> dict[str, np.ndarray]:
        got = {}
        for f in d.glob("*.safetensors"):
            for info in read_header(f)[1].values():
                from ftlab.interop.hf_in import read_tensor

                got[info.name] = read_tensor(info)
        return got

    theirs, ours = tensors(src), tensors(out)
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert v.shape == theirs[k].shape and np.array_equal(v, theirs[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == json.loads((src / "config.json").read_text())["model_type"]


def test_plan_of_a_hf_checkpoint_reads_no_weights(tmp_path: Path) -> None:
    """mode=plan reads config.json only: nothing is converted (the cache stays empty)."""
    import os

    cache = tmp_path / "cache"
    os.environ["FTLAB_CACHE"] = str(cache)
    try:
        proc = run_ftlab_forked(
            tmp_path,
            "mode=plan",
            f"model.name_or_path={FIXTURES / 'qwen2_moe-tiny-sharded-bf16'}",
            "data.max_length=128",
        )
    finally:
        os.environ.pop("FTLAB_CACHE", None)
    assert "fits" in proc.stdout + proc.stderr
    assert not cache.exists()
