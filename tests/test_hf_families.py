"""Hugging Face in for gemma, opt, deepseek_v2 and deepseek_v3: PaddleNLP 3.0.0b4's classes
compute transformers' function on the converted weights once ftlab's fixes are in (the
family rows' ``hf_config_defaults`` / ``tied_head_copy``, ``ftlab.models.compat``), in
eval mode and in training mode (the function LoRA fine-tunes); a whole run trains,
predicts and exports on them. Fixtures: tests/fixtures/hf (written by transformers; see
make_fixtures.py). No torch here.

Measured 2026-12-03 before -> after (max |logit diff| against transformers):
gemma 6.1e-4 -> 1.1e-6; opt 0.87 -> 6e-8; deepseek_v2 0.79 -> 1.7e-6 (against DeepSeek's
reference softmax scale, see live_client.py); deepseek_v3 forward failed -> 1.5e-6.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_ftlab_forked, run_in_process
from test_hf_out import merge

from ftlab.config.schema import ModelConfig
from ftlab.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
TOL = 1e-4
NAMES = [
    "gemma-tiny",
    "opt-tiny",
    "deepseek_v2-tiny",
    "deepseek_v3-tiny",
    "opt-tiny-bpe",  # tied head, with a tokenizer
    "deepseek_v3-tiny-bpe",  # random non-zero routing bias, with a tokenizer
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ftlab-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftlab.interop import hf_in

    monkeypatch.setenv("FTLAB_CACHE", str(cache))
    monkeypatch.setattr(hf_in, "_converted", {})


def logits_of(model, ids: list) -> np.ndarray:
    import paddle

    from ftlab.models.loading import output_logits

    with paddle.no_grad():
        return output_logits(model(paddle.to_tensor(ids))).numpy()


def load(name: str):
    from ftlab.models.loading import load_model

    return load_model(ModelConfig(name_or_path=str(FIXTURES / name)), "float32")


def no_dropout(model) -> None:
    """Training mode without its randomness (OPT's config has dropout 0.1)."""
    import paddle

    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.Dropout):
            layer.p = 0.0


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_in_eval_and_training_mode(name: str) -> None:
    d = FIXTURES / name
    ids = json.loads((d / "expected.json").read_text())["input_ids"]
    want = np.load(d / "expected_logits.npy")
    model = load(name)
    model.eval()
    diff = float(np.abs(logits_of(model, ids) - want).max())
    assert diff <= TOL, diff
    model.train()
    no_dropout(model)
    diff = float(np.abs(logits_of(model, ids) - want).max())
    assert diff <= TOL, diff  # the function a fine-tune starts from is the checkpoint's


@pytest.mark.parametrize("name", ["gemma-tiny", "deepseek_v2-tiny"])
def test_lora_steps_train_on_the_converted_checkpoint(name: str) -> None:
    """ftlab's LoRA on the loaded checkpoint: a few optimizer steps lower the loss and move
    only the adapter (the fixtures without a tokenizer; the two with one run whole below)."""
    import paddle

    from ftlab.methods.lora import Lora, LoraMethodConfig
    from ftlab.models.config_json import resolve_model

    model_cfg = resolve_model(ModelConfig(name_or_path=str(FIXTURES / name)))
    model = Lora().apply(load(name), LoraMethodConfig(name="lora", lora_rank=4), model_cfg)
    base = {k: v.numpy().copy() for k, v in model.state_dict().items() if "lora" not in k}
    trainable = {k: p for k, p in model.named_parameters() if not p.stop_gradient}
    assert trainable and all("lora" in k for k in trainable)
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=list(trainable.values()))
    ids = paddle.to_tensor(json.loads((FIXTURES / name / "expected.json").read_text())["input_ids"])
    model.train()
    losses = []
    for _ in range(5):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out[0] if isinstance(out, (tuple, list)) else out.loss
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    after = {k: v.numpy() for k, v in model.state_dict().items() if "lora" not in k}
    assert all(np.array_equal(base[k], after[k]) for k in base)


@pytest.fixture(
    scope="module",
    params=["opt-tiny-bpe", pytest.param("deepseek_v3-tiny-bpe", marks=pytest.mark.slow)],
)
def hf_run(request, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    import os

    cwd = tmp_path_factory.mktemp("cwd")
    os.environ["FTLAB_CACHE"] = str(cache)  # the subprocess's cache
    try:
        run_ftlab_forked(
            cwd,
            f"model.name_or_path={FIXTURES / request.param}",
            "data.max_length=128",
            "train.max_steps=3",
            "eval.max_new_tokens=4",
        )
    finally:
        os.environ.pop("FTLAB_CACHE", None)
    (run,) = (cwd / "outputs").glob(f"*/*_{request.param}_lora")
    return run


def test_run_predict_and_hf_export_on_the_family(hf_run: Path, tmp_path: Path) -> None:
    """Features meet: the default run (LoRA, generation eval) on the Hugging Face checkpoint,
    ftlab-predict on the run, and ftlab-merge --format hf giving back the source's names
    (OPT's head tied again: LoRA left the copy equal to the embedding) and the merged
    model's logits."""
    from test_hf_out import logits

    source = Path(
        json.loads((hf_run / "model_source.json").read_text())["hf_conversions"][0]["source"]
    )
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    # ftlab-predict and the plain merge as their mains in this process (each command's
    # subprocess is tested in test_e2e and test_hf_out); the --format hf export is the command.
    code = run_in_process(
        "ftlab-predict",
        str(hf_run),
        "--input",
        str(tmp_path / "p.jsonl"),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    assert "output" in json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    out, plain = tmp_path / "hf", tmp_path / "plain"
    proc = merge(str(hf_run), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_in_process("ftlab-merge", str(hf_run), "--out", str(plain)) == 0
    from ftlab.interop.hf_layout import read_header

    assert set(read_header(out / "model.safetensors")[1]) == set(
        read_header(source / "model.safetensors")[1]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == json.loads((source / "config.json").read_text()).get(
        "tie_word_embeddings", True
    )
    diff = float(np.abs(logits(out) - logits(plain)).max())
    assert diff <= 1e-5, diff


def test_full_fine_tuned_opt_head_is_exported_untied(tmp_path: Path) -> None:
    """Once the head copy differs from the embedding (full fine-tuning moves them apart),
    the export writes it as lm_head.weight and says untied: transformers then computes the
    trained model, not one whose head is the trained embedding."""
    import paddle

    from ftlab.interop.hf_out import export_weights, head_tied

    model = load("opt-tiny")
    assert head_tied(model)
    head = model.lm_head.decoder_weight
    head.set_value(head + paddle.full(head.shape, 0.5, head.dtype))
    assert not head_tied(model)
    record = export_weights(model, tmp_path, "float32", 10**9)
    assert not record["left_out"]
    from ftlab.interop.hf_in import read_tensor
    from ftlab.interop.hf_layout import read_header

    tensors = read_header(tmp_path / "model.safetensors")[1]
    np.testing.assert_array_equal(read_tensor(tensors["lm_head.weight"]), head.numpy())


def _config_copy(tmp_path: Path, name: str, **changes) -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_gemma_activation_other_than_gelu_is_refused(tmp_path: Path) -> None:
    from ftlab.models.config_json import resolve_model

    d = _config_copy(tmp_path, "gemma-tiny", hidden_act="silu")
    with pytest.raises(ConfigError, match="hidden_act='silu': ftlab runs Gemma's MLP"):
        resolve_model(ModelConfig(name_or_path=str(d)))


def test_deepseek_v3_routing_is_transformers_whatever_config_json_says(tmp_path: Path) -> None:
    """transformers' DeepSeek-V3 ignores topk_method/scoring_func: the converted copy
    carries the routing it computes (sigmoid, noaux_tc), and the router bias is counted."""
    from ftlab.interop.hf_in import paddle_dir
    from ftlab.models.config_json import resolve_model

    d = _config_copy(tmp_path, "deepseek_v3-tiny", topk_method="greedy")
    converted = json.loads((Path(paddle_dir(str(d), False)) / "config.json").read_text())
    assert (converted["topk_method"], converted["scoring_func"]) == ("noaux_tc", "sigmoid")
    plain = resolve_model(ModelConfig(name_or_path=str(FIXTURES / "deepseek_v3-tiny")))
    assert plain.arch.router_bias


def test_exact_gelu_gemma_config_keeps_exact_gelu(tmp_path: Path) -> None:
    """The activation comes from config.json: hidden_act=gelu (PaddleNLP's own default)
    computes exact GELU, and so differs from the tanh fixture's logits."""
    d = _config_copy(tmp_path, "gemma-tiny", hidden_act="gelu")
    model = load_model_dir(d)
    mlp = model.gemma.layers[0].mlp
    assert mlp.gelu_approximate is False
    assert load("gemma-tiny").gemma.layers[0].mlp.gelu_approximate is True


def load_model_dir(d: Path):
    from ftlab.models.loading import load_model

    return load_model(ModelConfig(name_or_path=str(d)), "float32")


@pytest.mark.parametrize("name", ["gemma-tiny", "opt-tiny", "deepseek_v2-tiny", "deepseek_v3-tiny"])
def test_batched_cached_generation_equals_greedy_recomputation(name: str) -> None:
    """ftlab's generation (left padding, explicit mask and positions, key/value cache) gives
    each prompt what greedy decoding by full forward passes gives it alone (PaddleNLP's
    DeepSeek-V3 dropped mask, positions and cache before ftlab's fix)."""
    from types import SimpleNamespace

    import paddle

    from ftlab.evaluation.generation import generate_token_ids

    model = load(name)
    model.eval()
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=127, pad_token_id=0)
    prompts = [[1, 50, 60, 70], [1, 80, 90, 100, 110, 120, 33]]

    def greedy(ids: list[int], n: int) -> list[int]:
        ids = list(ids)
        for _ in range(n):
            ids.append(int(logits_of(model, [ids])[0, -1].argmax()))
        return ids[-n:]

    with paddle.no_grad():
        got = generate_token_ids(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert got == [greedy(p, 6) for p in prompts]


def test_generation_with_a_tokenizer_without_bos() -> None:
    """Qwen2's tokenizer has no bos token: prompts are encoded without one, as training
    encodes them and as transformers does (ftlab's generation, ftlab-predict and the merge
    probe failed on it: "the tokenizer defines no bos_token_id")."""
    from ftlab.evaluation.generation import generate_texts, prompt_ids
    from ftlab.methods.reopen import probe_logits
    from ftlab.models.loading import load_tokenizer

    cfg = ModelConfig(name_or_path=str(FIXTURES / "qwen2-tiny"))
    tok = load_tokenizer(cfg)
    assert tok.bos_token_id is None
    exp = json.loads((FIXTURES / "qwen2-tiny" / "expected.json").read_text())
    assert prompt_ids(tok, exp["texts"][0]) == exp["tokens"]["fast"][0]
    model = load("qwen2-tiny")
    texts = generate_texts(model, tok, ["Once upon a time", "Lily"], max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert probe_logits(model, tok).shape[-1] == model.config.vocab_size
