"""The demo task: story generator, entity-recall metric and batched generation."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ftlab.demo import make_stories
from ftlab.demo.make_stories import build_splits, combo_key
from ftlab.evaluation.entity_recall import count_entity, entity_hits, entity_recall

SHIPPED = Path(make_stories.__file__).resolve().parents[1] / "assets" / "demo_stories"


# --------------------------------------------------------------------------- generator


@pytest.mark.fast
def test_generator_reruns_are_byte_identical_and_match_shipped_files(tmp_path: Path) -> None:
    for run in ("a", "b"):
        assert make_stories.main(["--out", str(tmp_path / run)]) == 0
    for name in ("train.json", "dev.json"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
        assert first == (SHIPPED / name).read_bytes(), f"shipped {name} is stale: regenerate it"


@pytest.mark.fast
def test_splits_sizes_and_dev_combinations_unseen_in_train() -> None:
    train, dev = build_splits()
    assert (len(train), len(dev)) == (2000, 48)
    assert len({r["src"] for r in train}) == 2000
    train_keys = {combo_key(r) for r in train}
    dev_keys = {combo_key(r) for r in dev}
    assert len(dev_keys) == 48
    assert not train_keys & dev_keys
    # Dev recombines entities train has seen; it never asks for an unseen word.
    for pos in range(3):
        assert {k[pos] for k in dev_keys} <= {k[pos] for k in train_keys}


@pytest.mark.fast
def test_records_are_well_formed_and_mention_each_entity_twice() -> None:
    train, dev = build_splits()
    assert dev[0] == {
        "src": "Please write a short story. It is about a duck named Amy who wants a white bag.",
        "tgt": "Once upon a time, a little duck named Amy saw a white bag in a shop. Amy wanted "
        "the white bag very much. Her mom said yes, and the duck was so happy.",
        "entities": ["Amy", "duck", "white bag"],
    }
    for r in train + dev:
        assert set(r) == {"src", "tgt", "entities"}
        assert all(count_entity(e, r["src"]) == 1 for e in r["entities"]), r
        assert all(count_entity(e, r["tgt"]) >= 2 for e in r["entities"]), r


@pytest.mark.fast
def test_different_seed_gives_different_dev_set() -> None:
    _, dev_a = build_splits(seed=1, n_train=10, n_dev=5)
    _, dev_b = build_splits(seed=2, n_train=10, n_dev=5)
    assert [combo_key(r) for r in dev_a] != [combo_key(r) for r in dev_b]


# --------------------------------------------------------------------------- matching


@pytest.mark.fast
@pytest.mark.parametrize(
    ("entity", "text", "expected"),
    [
        ("Max", "max ran home.", 1),
        ("Max", "Max's ball. MAX!", 2),
        ("Max", "Maxi and Tmax", 0),
        ("cat", "The cats sat.", 0),
        ("cat", "a cat, a cat.", 2),
        ("red ball", "the Red Ball", 1),
        ("red ball", "a red\n  ball", 1),
        ("red ball", "a red big ball", 0),
        ("red ball", "a red-ball", 0),
        ("red ball", "the ball is red", 0),
        ("red ball", "red balls", 0),
        ("red ball", "shred ball", 0),
    ],
)
def test_entity_matching_rules(entity: str, text: str, expected: int) -> None:
    assert count_entity(entity, text) == expected


@pytest.mark.fast
def test_entity_hits_per_entity() -> None:
    text = "Once upon a time, Sue the fox found a blue box."
    assert entity_hits(["sue", "fox", "blue box", "red box", "Tim"], text) == [
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.fast
def test_empty_entity_is_rejected() -> None:
    with pytest.raises(ValueError, match="no words"):
        count_entity("  ", "anything")


# --------------------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small sentencepiece BPE tokenizer (bos 1, eos 2, unk 0, no pad), like stories260K's."""
    import sentencepiece as spm
    from paddlenlp.transformers import LlamaTokenizer

    train, _ = build_splits(n_train=300, n_dev=4)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([r["src"] for r in train] + [r["tgt"] for r in train]),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "sentencepiece.bpe.model"
    path.write_bytes(buf.getvalue())
    tok = LlamaTokenizer(vocab_file=str(path))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        0,
        1,
        2,
        None,
    )
    return tok


def _tiny_llama(vocab_size: int, init_range: float) -> Any:
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def random_model(tokenizer: Any) -> Any:
    # A wide init makes logits decisive and outputs varied, so padding bugs show.
    return _tiny_llama(tokenizer.vocab_size, init_range=0.5)


@pytest.fixture(scope="module")
def memorised() -> list[dict[str, Any]]:
    train, _ = build_splits()
    return train[:2]


@pytest.fixture(scope="module")
def memorising_model(tokenizer: Any, memorised: list[dict[str, Any]]) -> Any:
    """A tiny model trained, as the pipeline trains, until it reproduces two stories."""
    import paddle

    model = _tiny_llama(tokenizer.vocab_size, init_range=0.02)
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters())
    batches = []
    for r in memorised:
        src = tokenizer(r["src"], add_special_tokens=False)["input_ids"]
        tgt = tokenizer(r["tgt"], add_special_tokens=False)["input_ids"]
        seq = [tokenizer.bos_token_id, *src, *tgt, tokenizer.eos_token_id]
        labels = [-100] * len(src) + tgt + [tokenizer.eos_token_id]  # = seq[1:], prompt masked
        batches.append((paddle.to_tensor([seq[:-1]]), paddle.to_tensor([labels])))
    model.train()
    for _ in range(300):
        total = 0.0
        for ids, labels in batches:
            loss = model(input_ids=ids, labels=labels)[0]
            loss.backward()
            total += float(loss)
        opt.step()
        opt.clear_grad()
        if total < 0.01:
            return model
    raise AssertionError(f"tiny model did not memorise two stories (loss {total:.3f})")


# --------------------------------------------------------------------------- generation


PROMPTS = [
    "Write a short story about a dog named Max who finds a red ball.",
    "Hi",
    "",
    "Tell me a story about Sue the fox, who shares her blue box with a friend.",
    "Once upon a time",
]


def test_greedy_continues_training_format_and_stops_at_eos(
    memorising_model: Any, tokenizer: Any, memorised: list[dict[str, Any]]
) -> None:
    from ftlab.evaluation.generation import generate_texts

    prompts = [r["src"] for r in memorised]
    outs = generate_texts(memorising_model, tokenizer, prompts, max_new_tokens=200, pad_token_id=0)
    assert outs == [r["tgt"] for r in memorised]


def test_max_new_tokens_truncates(
    memorising_model: Any, tokenizer: Any, memorised: list[dict[str, Any]]
) -> None:
    from ftlab.evaluation.generation import generate_texts

    tgt_ids = tokenizer(memorised[0]["tgt"], add_special_tokens=False)["input_ids"]
    for n, expected in ((1, "Once"), (4, "Once upon a time")):
        out = generate_texts(
            memorising_model, tokenizer, [memorised[0]["src"]], max_new_tokens=n, pad_token_id=0
        )
        assert out == [expected] == [tokenizer.decode(tgt_ids[:n])]


def test_one_output_per_prompt_greedy_deterministic_batch_equals_single(
    random_model: Any, tokenizer: Any
) -> None:
    from ftlab.evaluation.generation import generate_texts

    kw = {"max_new_tokens": 8, "pad_token_id": 0}
    batched = generate_texts(random_model, tokenizer, PROMPTS, batch_size=4, **kw)
    assert len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in batched)
    assert len(set(batched)) == len(PROMPTS)  # varied outputs: the comparison below has teeth
    assert generate_texts(random_model, tokenizer, PROMPTS, batch_size=4, **kw) == batched
    single = [generate_texts(random_model, tokenizer, [p], **kw)[0] for p in PROMPTS]
    assert single == batched
    assert generate_texts(random_model, tokenizer, [], **kw) == []


def test_model_mode_is_restored(random_model: Any, tokenizer: Any) -> None:
    from ftlab.evaluation.generation import generate_texts

    for mode in ("train", "eval"):
        getattr(random_model, mode)()
        generate_texts(random_model, tokenizer, ["Hi"], max_new_tokens=2, pad_token_id=0)
        assert random_model.training is (mode == "train")


def test_sampling_seed_reproducible_and_global_rng_untouched(
    random_model: Any, tokenizer: Any
) -> None:
    import paddle

    from ftlab.evaluation.generation import generate_texts

    kw = {"max_new_tokens": 12, "pad_token_id": 0, "strategy": "sampling", "top_k": 20}
    a = generate_texts(random_model, tokenizer, PROMPTS, seed=7, **kw)
    assert generate_texts(random_model, tokenizer, PROMPTS, seed=7, **kw) == a
    assert generate_texts(random_model, tokenizer, PROMPTS, seed=8, **kw) != a
    paddle.seed(123)
    expected = paddle.rand([4]).numpy().tolist()
    paddle.seed(123)
    generate_texts(random_model, tokenizer, PROMPTS, seed=7, **kw)
    assert paddle.rand([4]).numpy().tolist() == expected


def test_lora_wrapped_model_generates(random_model: Any, tokenizer: Any) -> None:
    import paddle
    from paddlenlp.peft import LoRAConfig, LoRAModel

    from ftlab.evaluation.generation import generate_texts

    base = generate_texts(random_model, tokenizer, PROMPTS, max_new_tokens=8, pad_token_id=0)
    lora = LoRAModel(
        random_model, LoRAConfig(target_modules=[".*q_proj", ".*v_proj"], r=4, lora_alpha=8)
    )
    try:
        # B starts at zero: the adapter changes nothing yet.
        assert generate_texts(lora, tokenizer, PROMPTS, max_new_tokens=8, pad_token_id=0) == base
        paddle.seed(1)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.set_value(paddle.randn(p.shape) * 2.0)
        tuned = generate_texts(lora, tokenizer, PROMPTS, max_new_tokens=8, pad_token_id=0)
        assert len(tuned) == len(PROMPTS) and tuned != base
    finally:
        lora.restore_original_model()


def test_missing_pad_token_and_ignored_sampling_settings_fail(
    random_model: Any, tokenizer: Any
) -> None:
    from ftlab.evaluation.generation import generate_texts

    with pytest.raises(ValueError, match="no pad token"):
        generate_texts(random_model, tokenizer, ["Hi"])
    with pytest.raises(ValueError, match="only apply to strategy='sampling'"):
        generate_texts(random_model, tokenizer, ["Hi"], top_k=5, pad_token_id=0)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        generate_texts(random_model, tokenizer, ["Hi"], max_new_tokens=300, pad_token_id=0)


# --------------------------------------------------------------------------- metric


def test_entity_recall_on_a_model_with_known_outputs(
    memorising_model: Any, tokenizer: Any, memorised: list[dict[str, Any]]
) -> None:
    first, second = memorised
    name2 = second["entities"][0]
    records = [
        first,  # the model tells exactly this story: 3 of 3
        {"src": second["src"], "tgt": "", "entities": [name2, "unicorn"]},  # 1 of 2
        {"src": "no entities: not scored", "tgt": "x"},
    ]
    result = entity_recall(memorising_model, tokenizer, records, max_new_tokens=200, pad_token_id=0)
    assert (result.n_records, result.n_entities, result.n_hits) == (2, 5, 4)
    assert result.score == pytest.approx(0.8)
    assert [d.hits for d in result.records] == [[True, True, True], [True, False]]
    assert result.records[0].prompt == first["src"]
    assert result.records[0].output == first["tgt"]
    json.dumps([vars(d) for d in result.records])  # details serialise for samples.jsonl


def test_entity_recall_needs_scorable_records(random_model: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="nothing to score"):
        entity_recall(random_model, tokenizer, [{"src": "a", "tgt": "b"}], pad_token_id=0)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        entity_recall(random_model, tokenizer, [{"src": "a", "entities": []}], pad_token_id=0)
