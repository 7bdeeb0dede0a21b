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


TEXTS = [
    "Once upon a time, a little duck named Sue found a green ball.",
    "  two leading spaces,\nline two\ttab and trailing  ",
    "numbers 12345 and caf\u0065\u0301 na\u00efve",  # a decomposed e-acute: NFC in Qwen
    "",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|extra_{i}|>" for i in range(205)
]
# tokenization_qwen.py's pre-tokenizer pattern (Qwen-7B's PAT_STR, a data constant)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def qwen_reference(d: Path) -> tuple[object, dict[str, int]]:
    """Qwen-1's own tokenization as tokenization_qwen.py builds it, with the tiktoken
    package directly: the ranks of ``qwen.tiktoken``, the 208 special tokens right after
    them (Qwen-7B pins their first id, 151643, which is its rank count), every special
    token allowed in text, NFC-normalised input."""
    import base64

    import tiktoken

    ranks = {
        base64.b64decode(tok): int(rank)
        for tok, rank in (line.split() for line in (d / "qwen.tiktoken").read_bytes().splitlines())
    }
    specials = {t: len(ranks) + i for i, t in enumerate(QWEN_SPECIALS)}
    enc = tiktoken.Encoding(
        "qwen-reference", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return enc, specials


def test_qwen_ids_equal_tiktoken_with_qwens_ranks_and_special_tokens() -> None:
    """The ids ftlab trains on (its text encoder over the staged QWenTokenizer, no bos,
    ``<|endoftext|>`` after each text) are tiktoken's over the checkpoint's own ranks and
    special tokens; the eos is Qwen's end-of-text (its ``eod_id``)."""
    import unicodedata

    from ftlab.data.encoder import TextEncoder, leading_ids
    from ftlab.interop.hf_in import conversion_records
    from ftlab.models.loading import load_tokenizer

    d = HF / "qwen-tiny"
    tok = load_tokenizer(ModelConfig(name_or_path=str(d), pad_token="<|extra_0|>"))
    assert type(tok).__name__ == "QWenTokenizer"
    enc, specials = qwen_reference(d)
    texts = [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]
    ref = [enc.encode(unicodedata.normalize("NFC", t), allowed_special="all") for t in texts]
    assert any(i >= 256 for ids in ref for i in ids)  # the merges are exercised
    assert TextEncoder(tok).encode(texts) == ref
    assert leading_ids(tok) == []
    assert tok.eos_token_id == specials["<|endoftext|>"] == enc.eot_token == 296
    assert tok.pad_token_id == specials["<|extra_0|>"]
    (record,) = conversion_records()
    assert "qwen.tiktoken" in record["source_files"]
    assert record["tokenizer"]["family_values"] == {"eos_token": "<|endoftext|>"}


def test_chatglm2_ids_equal_sentencepiece_with_gmask_sop_prefix() -> None:
    """ChatGLM2's tokenizer.model is staged for PaddleNLP's ChatGLMv2Tokenizer (not v1's
    class the file's "ChatGLMTokenizer" would pick): the ids are sentencepiece's own, after
    the ``[gMASK] sop`` prefix tokenization_chatglm.py puts before every input (the special
    tokens follow the sentencepiece pieces: [MASK], [gMASK], [sMASK], sop, eop); eos
    ``</s>``, pad ``<unk>``."""
    import sentencepiece as spm

    from ftlab.data.encoder import TextEncoder, leading_ids
    from ftlab.evaluation.generation import prompt_ids
    from ftlab.interop.hf_in import conversion_records
    from ftlab.models.loading import load_tokenizer

    d = HF / "chatglm2-tiny"
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    n = sp.vocab_size()
    gmask, sop = n + 1, n + 3
    tok = load_tokenizer(ModelConfig(name_or_path=str(d)))
    assert type(tok).__name__ == "ChatGLMv2Tokenizer"
    # chatglm2-6b's class encodes special-token strings in text as plain text
    texts = [*TEXTS, "Aesop told a story.", "end </s> and <unk> and [gMASK] here", "eop sop"]
    assert TextEncoder(tok).encode(texts) == [sp.encode(t) for t in texts]
    assert leading_ids(tok) == [gmask, sop]
    assert prompt_ids(tok, TEXTS[0]) == [gmask, sop, *sp.encode(TEXTS[0])]
    assert tok(TEXTS[0])["input_ids"] == [gmask, sop, *sp.encode(TEXTS[0])]
    assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.unk_id()) == (2, 0)
    (record,) = conversion_records()
    assert record["tokenizer"]["family_values"] == {
        "tokenizer_class": "ChatGLMv2Tokenizer",
        "encode_special_tokens": False,
    }
    # an SFT example as the default run builds it (plain template): prefix, prompt, answer
    from ftlab.data.examples import ExampleBuilder, Limits
    from ftlab.data.formats import Conversation, Turn
    from ftlab.data.templates import PlainRenderer

    builder = ExampleBuilder(tok, PlainRenderer(), Limits(64, 128, "error"))
    conv = Conversation(None, (Turn(TEXTS[0], TEXTS[1]),))
    assert builder.prompt_ids(conv) == [gmask, sop, *sp.encode(TEXTS[0])]


def test_pad_token_outside_get_vocab_must_still_be_a_token_of_the_tokenizer() -> None:
    """QWenTokenizer's special tokens are not in ``get_vocab()``: accepted as
    model.pad_token when the tokenizer maps them to an id and back; a string that is no
    token of it is still refused in one line."""
    from ftlab.models.loading import load_tokenizer

    d = str(HF / "qwen-tiny")
    tok = load_tokenizer(ModelConfig(name_or_path=d, pad_token="<|endoftext|>"))
    assert tok.pad_token_id == tok.eos_token_id == 296
    for bad in ("<|extra_999|>", "<pad>", "endoftext"):
        with pytest.raises(ModelLoadError, match="not in the vocabulary") as err:
            load_tokenizer(ModelConfig(name_or_path=d, pad_token=bad))
        assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="no pad token"):
        load_tokenizer(ModelConfig(name_or_path=d))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("qwen-tiny", ["model.pad_token='<|extra_0|>'"]), ("chatglm2-tiny", [])],
)
def test_three_step_lora_run_with_the_checkpoints_own_tokenizer(
    name: str, overrides: list[str], tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default run (LoRA, generation eval on) on a copy of the checkpoint completes
    with its own tokenizer, and ftlab-predict generates from it."""
    from helpers import run_ftlab_forked, run_in_process

    src = tmp_path / name
    shutil.copytree(HF / name, src)
    monkeypatch.setenv("FTLAB_CACHE", str(cache))  # the subprocesses' cache
    short = ["data.max_length=128", "train.max_steps=3", "eval.max_new_tokens=4"]
    run_ftlab_forked(tmp_path, f"model.name_or_path={src}", *overrides, *short)
    (run,) = (tmp_path / "outputs").glob(f"*/*_{name}_lora")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["data"]["train"]["examples"] > 0
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    out = tmp_path / "o.jsonl"
    # ftlab-predict's main in this process (the command's subprocess: test_e2e).
    code = run_in_process(
        "ftlab-predict",
        str(run),
        "--input",
        str(tmp_path / "p.jsonl"),
        "--output",
        str(out),
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    assert isinstance(json.loads(out.read_text().splitlines()[0])["output"], str)


def test_generated_ids_past_the_tokenizer_are_left_out_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Qwen's embedding is padded past its tokenizer (fixture: 512 rows, 504 tokens); an id
    there is no text (tiktoken raises on it): left out of the decoded text, with a warning
    that counts it."""
    import logging

    from ftlab.evaluation.generation import _tokenizer_ids
    from ftlab.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(HF / "qwen-tiny"), pad_token="<|extra_0|>"))
    assert len(tok) == 504
    with caplog.at_level(logging.WARNING, logger="ftlab.evaluation.generation"):
        kept = _tokenizer_ids(tok, [[97, 510, 98, 503], [99]])
    assert kept == [[97, 98, 503], [99]]
    assert tok.decode(kept[0]) == "ab<|extra_204|>"
    assert "1 generated ids are past the tokenizer's 504 tokens" in caplog.text
