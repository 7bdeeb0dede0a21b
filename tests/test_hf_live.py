"""Live checks against the real Hugging Face client (``make test-hf``): transformers and
peft run in their own venv (``FTLAB_HF_PYTHON``), never in ftlab's process.

HF in: ftlab's logits and token ids equal transformers' for the fixtures. Out: a run
trained by ftlab on a Hugging Face checkpoint, exported with ``--format hf``, gives
transformers the logits of ftlab's merged model and ftlab-predict's greedy generations;
``--format hf-peft`` on the HF base in ``peft.PeftModel`` gives ftlab's adapter logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_e2e import FTLAB, run_ftlab
from test_hf_in import FIXTURES, MATCHING, logits

pytestmark = [
    pytest.mark.hf_live,
    pytest.mark.skipif(
        not os.environ.get("FTLAB_HF_PYTHON"),
        reason="needs FTLAB_HF_PYTHON (a python with torch, transformers, peft): make test-hf",
    ),
]
CLIENT = FIXTURES / "live_client.py"
TOL = 1e-4
IDS = [[1, 17, 42, 99, 7, 250, 3, 11], [1, 400, 2, 5, 61, 300, 12, 8]]
BASE = FIXTURES / "llama-stories260k-bf16"


def client(*args: str) -> None:
    proc = subprocess.run(
        [os.environ["FTLAB_HF_PYTHON"], str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def hf_logits(tmp_path: Path, model_dir: Path, ids: list, adapter: Path | None = None):
    out = tmp_path / f"{model_dir.name}-{adapter.name if adapter else 'base'}.npy"
    client(
        "logits", str(model_dir), json.dumps(ids), str(out), *([str(adapter)] if adapter else [])
    )
    return np.load(out)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch) -> None:
    from ftlab.interop import hf_in

    root = tmp_path_factory.getbasetemp() / "ftlab-cache"
    monkeypatch.setenv("FTLAB_CACHE", str(root))
    monkeypatch.setattr(hf_in, "_converted", {})


@pytest.mark.parametrize("name", MATCHING)
def test_hf_in_logits_equal_live_transformers(name: str, tmp_path: Path) -> None:
    ids = json.loads((FIXTURES / name / "expected.json").read_text())["input_ids"]
    diff = float(
        np.abs(logits(FIXTURES / name, ids) - hf_logits(tmp_path, FIXTURES / name, ids)).max()
    )
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize(
    "name", ["llama-stories260k-bf16", "llama-tiny-sharded-fp16", "qwen2-tiny"]
)
def test_token_ids_equal_live_transformers(name: str, tmp_path: Path) -> None:
    from ftlab.config.schema import ModelConfig
    from ftlab.models.loading import load_tokenizer

    texts = json.loads((FIXTURES / name / "expected.json").read_text())["texts"]
    client("tokens", str(FIXTURES / name), json.dumps(texts), str(tmp_path / "t.json"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(FIXTURES / name), pad_token="<unk>"))
    assert [tok(t)["input_ids"] for t in texts] == json.loads((tmp_path / "t.json").read_text())


# LoRA runs on: the Hugging Face stories260K (Llama), a Qwen2 (its tokenizer has no bos),
# an OPT with a tied head and a DeepSeek-V3 with a routing bias (tests/test_hf_families.py)
RUNS = {
    "llama": (BASE, ["model.pad_token='<unk>'"]),
    "qwen2": (FIXTURES / "qwen2-tiny", ["data.max_length=128", "eval.max_new_tokens=4"]),
    "opt": (FIXTURES / "opt-tiny-bpe", ["data.max_length=128", "eval.max_new_tokens=4"]),
    "deepseek_v3": (
        FIXTURES / "deepseek_v3-tiny-bpe",
        ["data.max_length=128", "eval.max_new_tokens=4"],
    ),
}


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("cwd")
    os.environ["FTLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "ftlab-cache")
    base, settings = RUNS[request.param]
    try:
        run_ftlab(cwd, f"model.name_or_path={base}", *settings, "train.max_steps=30")
    finally:
        os.environ.pop("FTLAB_CACHE", None)
    (run,) = (cwd / "outputs").glob("*/*_lora")
    return run


def merge(*args: str) -> None:
    proc = subprocess.run(
        [str(FTLAB.with_name("ftlab-merge")), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_gives_transformers_the_merged_model(trained: Path, tmp_path: Path) -> None:
    hf, plain = tmp_path / "hf", tmp_path / "plain"
    merge(str(trained), "--format", "hf", "--out", str(hf))
    merge(str(trained), "--out", str(plain))
    diff = float(np.abs(hf_logits(tmp_path, hf, IDS) - logits(plain, IDS)).max())
    print(f"{trained.name} export: max |logit diff| transformers vs ftlab merged {diff:.2e}")
    assert diff <= TOL
    prompts = ["Once upon a time", "Lily saw a big dog", "The sun"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    predict = subprocess.run(
        [
            str(FTLAB.with_name("ftlab-predict")),
            str(trained),
            "--input",
            str(tmp_path / "p.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--max-new-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    ours = [json.loads(x)["output"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    client("generate", str(hf), json.dumps(prompts), "24", str(tmp_path / "g.json"))
    theirs = json.loads((tmp_path / "g.json").read_text())
    print("ftlab-predict:", ours, "\ntransformers: ", theirs)
    assert [o.strip() for o in ours] == [t.strip() for t in theirs]


def test_peft_adapter_equals_ftlab_adapter(trained: Path, tmp_path: Path) -> None:
    import paddle

    from ftlab.methods.reopen import load_trained
    from ftlab.models.loading import output_logits

    out = tmp_path / "peft"
    merge(str(trained), "--format", "hf-peft", "--out", str(out))
    model, _ = load_trained(trained)
    model.eval()
    with paddle.no_grad():
        ours = output_logits(model(paddle.to_tensor(IDS))).numpy()
    source = Path(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    theirs = hf_logits(tmp_path, source, IDS, adapter=out)
    base = hf_logits(tmp_path, source, IDS)
    diff = float(np.abs(ours - theirs).max())
    effect = float(np.abs(theirs - base).max())
    print(f"{trained.name} peft: max |logit diff| {diff:.2e}; adapter effect {effect:.2e}")
    assert diff <= TOL and effect > 100 * TOL


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "hf_live", "-s"]))


@pytest.mark.parametrize(
    "name", ["llama-tiny-sharded-fp16", "qwen2-tiny", "qwen2_moe-tiny-sharded-bf16"]
)
def test_fixture_exported_by_ftlab_reads_back_in_transformers(name: str, tmp_path: Path) -> None:
    """Qwen2 and Qwen2-MoE (and a fast-tokenizer Llama) out: ftlab's export of a loaded
    checkpoint gives transformers the same logits and token ids as the original."""
    from test_hf_out import export_fixture

    out = tmp_path / "export"
    export_fixture(name, out, "float32")
    exp = json.loads((FIXTURES / name / "expected.json").read_text())
    theirs = hf_logits(tmp_path, out, exp["input_ids"])
    diff = float(np.abs(theirs - np.load(FIXTURES / name / "expected_logits.npy")).max())
    print(f"{name} exported: max |logit diff| {diff:.2e}")
    assert diff <= TOL
    client("tokens", str(out), json.dumps(exp["texts"]), str(tmp_path / "t.json"))
    assert json.loads((tmp_path / "t.json").read_text()) == exp["tokens"]["fast"]


@pytest.mark.parametrize(
    "name",
    [
        "gemma-tiny",
        "opt-tiny",
        "deepseek_v2-tiny",
        "deepseek_v3-tiny",
        "opt-tiny-bpe",
        "deepseek_v3-tiny-bpe",
    ],
)
def test_family_fixture_exported_by_ftlab_reads_back_in_transformers(
    name: str, tmp_path: Path
) -> None:
    """Gemma, OPT (tied head), DeepSeek-V2 and -V3 (routing bias) out: ftlab's export of
    the loaded checkpoint gives transformers the original's logits."""
    from test_hf_out import export_fixture

    out = tmp_path / "export"
    export_fixture(name, out, "float32")
    exp = json.loads((FIXTURES / name / "expected.json").read_text())
    theirs = hf_logits(tmp_path, out, exp["input_ids"])
    diff = float(np.abs(theirs - np.load(FIXTURES / name / "expected_logits.npy")).max())
    print(f"{name} exported: max |logit diff| {diff:.2e}")
    assert diff <= TOL
