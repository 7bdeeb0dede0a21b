"""BLEU-4 / ROUGE-1/2/L of dev generations: ftlab's numbers equal PaddleNLP's own metric
functions, used the way PaddleNLP's fine-tuning script uses them, on fixed predictions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import REPO

from ftlab.evaluation.text_metrics import _lcs, resolve_units, score_texts, split_units

ADVERTISEGEN = REPO / "tests" / "fixtures" / "advertisegen"


def paddlenlp_scores(predictions: list, references: list) -> dict[str, float]:
    """``compute_metrics_do_generation`` of PaddleNLP's llm/run_finetune.py, verbatim in
    what it calls: the metric classes get whatever units they are given (strings there)."""
    from paddlenlp.metrics import BLEU, Rouge1, Rouge2, RougeL

    rouge1, rouge2, rougel, bleu4 = Rouge1(), Rouge2(), RougeL(), BLEU(n_size=4)
    r1 = rouge1.score(predictions, references)
    r2 = rouge2.score(predictions, references)
    for pred, ref in zip(predictions, references, strict=True):
        rougel.add_inst(pred, [ref])
        bleu4.add_inst(pred, [ref])
    return {"rouge1": r1, "rouge2": r2, "rougel": rougel.score(), "bleu4": bleu4.score()}


def perturbed(text: str, rng: random.Random, units: str) -> str:
    """A prediction that shares some n-grams with the reference and differs elsewhere."""
    parts = split_units(text, units)
    keep = parts[: rng.randint(len(parts) // 3, len(parts))]
    for _ in range(rng.randint(0, 4)):
        i = rng.randrange(len(keep) + 1)
        keep.insert(i, rng.choice(parts))
    return ("" if units == "char" else " ").join(keep)


def test_chinese_scores_equal_paddlenlp_at_character_level() -> None:
    refs = [json.loads(x)["tgt"] for x in (ADVERTISEGEN / "train.json").read_text().splitlines()]
    rng = random.Random(0)
    preds = [perturbed(r, rng, "char") for r in refs]
    assert resolve_units(refs) == "char"
    ours = score_texts(preds, refs, "char")
    theirs = paddlenlp_scores(preds, refs)  # strings, exactly as run_finetune.py passes them
    assert ours.to_dict() | theirs == ours.to_dict()  # same keys, same values
    for key, value in theirs.items():
        assert getattr(ours, key) == pytest.approx(value, abs=1e-12), key
    assert 0.05 < ours.bleu4 < 0.95 and 0.05 < ours.rougel < 0.95  # a real spread, not 0/1


def test_english_scores_equal_paddlenlp_at_word_level() -> None:
    rows = [json.loads(x) for x in (REPO / "tests/fixtures/alpaca_seed/train.json").open()]
    refs = [r["output"] for r in rows if len(r["output"].split()) > 4]
    rng = random.Random(1)
    preds = [perturbed(r, rng, "word") for r in refs]
    assert resolve_units(refs) == "word"
    ours = score_texts(preds, refs, "word")
    theirs = paddlenlp_scores([p.split() for p in preds], [r.split() for r in refs])
    for key, value in theirs.items():
        assert getattr(ours, key) == pytest.approx(value, abs=1e-12), key
    assert 0.05 < ours.bleu4 < 0.95


def test_fast_lcs_equals_paddlenlp_rouge_l_lcs() -> None:
    from paddlenlp.metrics import RougeL

    rng = random.Random(2)
    for _ in range(50):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert _lcs(a, b) == int(RougeL().lcs(a, b))


def test_identical_and_empty_predictions() -> None:
    refs = ["the cat sat on the mat today", "a dog ran in the park at noon"]
    perfect = score_texts(refs, refs, "word")
    assert (perfect.bleu4, perfect.rouge1, perfect.rouge2, perfect.rougel) == pytest.approx(
        (1.0, 1.0, 1.0, 1.0)
    )
    # PaddleNLP's BLEU divides by zero when every prediction is empty; ftlab scores 0.
    empty = score_texts(["", ""], refs, "word")
    assert (empty.bleu4, empty.rouge1, empty.rouge2, empty.rougel) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="pair up"):
        score_texts(["x"], refs, "word")


@pytest.mark.fast
def test_units_setting() -> None:
    assert resolve_units(["hello world"], "char") == "char"
    assert resolve_units(["宽松的阔腿裤"], "word") == "word"
    assert resolve_units(["mixed 文本"]) == "char"
    assert split_units("a  b\nc", "word") == ["a", "b", "c"]
    assert split_units("阔腿 裤", "char") == ["阔", "腿", " ", "裤"]


def test_summary_and_predictions_of_a_run(tmp_path: Path) -> None:
    """The summary's generation block and predictions.jsonl rows, from a stub result."""
    from ftlab.evaluation.text_metrics import GenerationResult
    from ftlab.record.summary import Summary
    from ftlab.training.run import _generation_summary

    refs = ["the cat sat", "a dog ran"]
    base = GenerationResult(score_texts(["x y", "a cat"], refs, "word"), ["x y", "a cat"])
    tuned = GenerationResult(score_texts(refs, refs, "word"), list(refs))
    block = _generation_summary(base, tuned)
    assert block["units"] == "word" and block["records"] == 2
    assert block["finetuned"]["rougel"] == pytest.approx(1.0)
    text = Summary(generation=block).format()
    assert "generation     2 dev records, word-level" in text
    base_l = base.scores.rougel
    assert f"ROUGE-L {base_l:.3f} -> 1.000" in text and 0 < base_l < 1


def test_batched_generation_equals_one_by_one_on_the_shipped_model(tok) -> None:
    """The run generates its dev answers in left-padded batches (explicit attention mask and
    position ids); on the shipped model they equal the prompts generated one at a time."""
    from paddlenlp.transformers import AutoModelForCausalLM

    from ftlab.assets import asset_path
    from ftlab.evaluation.generation import generate_texts

    model = AutoModelForCausalLM.from_pretrained(str(asset_path("stories260k")), dtype="float32")
    dev = [json.loads(line) for line in (asset_path("demo_stories") / "dev.json").open()][:8]
    prompts = [r["src"] for r in dev]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # the batches are padded
    kw = {"max_new_tokens": 24, "pad_token_id": tok.pad_token_id}
    batched = generate_texts(model, tok, prompts, batch_size=8, **kw)
    assert len(set(batched)) > 1 and all(batched)
    assert generate_texts(model, tok, prompts, batch_size=3, **kw) == batched
    assert [generate_texts(model, tok, [p], batch_size=1, **kw)[0] for p in prompts] == batched


def test_flash_attention_batched_generation_equals_one_by_one(tok) -> None:
    """Under ``model.flash_attention=true`` PaddleNLP drops the padding mask at every
    decoding step after the first; ftlab generates padded batches on the eager path, so
    the batched answers still equal the prompts generated one at a time."""
    from ftlab.assets import asset_path
    from ftlab.config.schema import ModelConfig
    from ftlab.evaluation.generation import generate_texts
    from ftlab.models.loading import load_model

    cfg = ModelConfig(name_or_path=str(asset_path("stories260k")), pad_token="<unk>")
    model = load_model(cfg, "float32")
    model.config.use_flash_attention = True
    dev = [json.loads(line) for line in (asset_path("demo_stories") / "dev.json").open()][:8]
    prompts = [r["src"] for r in dev]
    kw = {"max_new_tokens": 24, "pad_token_id": tok.pad_token_id}
    batched = generate_texts(model, tok, prompts, batch_size=8, **kw)
    assert model.config.use_flash_attention  # restored after the padded batch
    assert [generate_texts(model, tok, [p], batch_size=1, **kw)[0] for p in prompts] == batched
