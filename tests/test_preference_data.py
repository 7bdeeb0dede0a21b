"""Preference data: formats detected, every bad record kind named by file and line, rows in
the layout PaddleNLP's DPO/KTO criteria read, truncation counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftlab.assets import asset_path
from ftlab.config.schema import DataConfig
from ftlab.data.preference_examples import build_preference_data, split_budget
from ftlab.errors import DataError

PAIR = {
    "src": "Tell me a story about a cat.",
    "tgt": [],
    "response": ["A cat sat.", "A dog ran."],
    "sort": [1, 0],
}


def write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build(tmp_path: Path, rows: list, tok, kind: str = "pairwise", dev: list | None = None, **cfg):
    write(tmp_path / "train.json", rows)
    if dev is not None:
        write(tmp_path / "dev.json", dev)
    config = DataConfig(name="t", path=str(tmp_path), **cfg)
    return build_preference_data(config, tok, kind=kind, seed=0, need_dev=dev is not None)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (PAIR, "src_response"),
        (
            {
                "src": "Tell me a story about a cat.",
                "tgt": [],
                "response": ["A dog ran.", "A cat sat."],
                "sort": [0, 3],
            },
            "src_response",
        ),
        (
            {
                "prompt": "Tell me a story about a cat.",
                "chosen": "A cat sat.",
                "rejected": "A dog ran.",
            },
            "prompt_chosen_rejected",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Tell me a story about a cat."}],
                "chosen": [{"role": "assistant", "content": "A cat sat."}],
                "rejected": [{"role": "assistant", "content": "A dog ran."}],
            },
            "prompt_chosen_rejected",
        ),
        (
            {
                "chosen": [
                    {"role": "user", "content": "Tell me a story about a cat."},
                    {"role": "assistant", "content": "A cat sat."},
                ],
                "rejected": [
                    {"role": "user", "content": "Tell me a story about a cat."},
                    {"role": "assistant", "content": "A dog ran."},
                ],
            },
            "chosen_rejected",
        ),
    ],
)
def test_every_pair_format_gives_the_same_row(tmp_path: Path, tok, row: dict, fmt: str) -> None:
    data = build(tmp_path, [row], tok)
    assert data.format == fmt
    item = data.train_dataset[0]
    prompt = [tok.bos_token_id, *enc(tok, "Tell me a story about a cat.")]
    chosen = enc(tok, "A cat sat.") + [tok.eos_token_id]
    rejected = enc(tok, "A dog ran.") + [tok.eos_token_id]
    # prompt[:-1] + [p] + chosen[:-1] + [p] + rejected[:-1]: each segment predicts its answer
    expected = prompt + chosen[:-1] + [prompt[-1]] + rejected[:-1]
    assert item["input_ids"].tolist() == expected
    s1 = len(prompt) - 1
    assert item["bounds"].tolist() == [[s1, s1 + len(chosen), s1 + len(chosen) + len(rejected), -1]]
    assert item["targets"][s1:].tolist() == chosen + rejected


def test_collated_batch_is_what_each_response_alone_would_see(tmp_path: Path, tok) -> None:
    data = build(tmp_path, [PAIR, dict(PAIR, response=["A big cat sat down.", "A dog."])], tok)
    batch = data.collate_fn([data.train_dataset[0], data.train_dataset[1]])
    assert set(batch) == {"input_ids", "position_ids", "attention_mask", "response_indexs"} | {
        "chosen_labels",
        "rejected_labels",
    }
    b, s1, s2, e = batch["response_indexs"][1].tolist()
    assert b == 1
    mask, pos = batch["attention_mask"][1], batch["position_ids"][1]
    # The rejected segment sees the prompt and itself, never the chosen segment.
    assert not mask[s2:e, s1:s2].any() and mask[s2:e, :s1].all()
    assert np.array_equal(mask[s2:e, s2:e], np.tri(e - s2, dtype=bool))
    assert pos[:s2].tolist() == list(range(s2))
    assert pos[s2:e].tolist() == list(range(s1, s1 + e - s2))
    assert not mask[e:].any()  # padding attends to nothing
    chosen = batch["chosen_labels"][1]
    assert (chosen[:s1] == 0).all() and (chosen[s2:] == 0).all() and (chosen[s1:s2] > 0).all()


def test_labelled_formats_and_pairs_for_kto(tmp_path: Path, tok) -> None:
    rows = [
        {"prompt": "Tell me a story about a cat.", "completion": "A cat sat.", "label": True},
        {"src": "Tell me a story.", "tgt": [], "response": ["A dog ran."], "sort": [0]},
    ]
    with pytest.raises(DataError, match="mix preference formats"):
        build(tmp_path, rows, tok, kind="labelled")
    undesirable = dict(rows[0], completion="A cat bit.", label=False)
    data = build(tmp_path, [rows[0], undesirable], tok, kind="labelled")
    assert data.format == "prompt_completion_label"
    # Only one kind, or one row: nothing to contrast (rewards/rejected stayed 0.000).
    with pytest.raises(DataError, match=r"stage=kto: .* 2 desirable and 0 undesirable .* 2 rows"):
        build(tmp_path, rows[:1] * 2, tok, kind="labelled")
    with pytest.raises(DataError, match=r"1 desirable and 0 undesirable completions in 1 rows"):
        build(tmp_path, rows[:1], tok, kind="labelled")
    data = build(tmp_path, [PAIR, PAIR], tok, kind="labelled")  # pairs: one of each label
    stats = data.stats.train
    assert (stats.pairs_split, stats.desirable, stats.undesirable) == (2, 2, 2)
    batch = data.collate_fn([data.train_dataset[i] for i in range(4)])
    assert batch["response_indexs"][:, 4].tolist() == [1, 0, 1, 0]
    assert {"response_labels", "response_kl_labels"} <= set(batch)
    # Row i's second segment (its KL completion) is row i+1's completion.
    first = data.train_dataset[0]
    s1, s2, e, _ = first["bounds"][0].tolist()
    assert first["targets"][s2:e].tolist() == enc(tok, "A dog ran.") + [tok.eos_token_id]


def test_auto_detection_refuses_sft_records(tmp_path: Path, tok) -> None:
    with pytest.raises(
        DataError,
        match=r"train.json:1: data.format=auto: none of the first 1 records is a preference record",
    ):
        build(tmp_path, [{"src": "hi", "tgt": "hello"}], tok)


def test_labelled_records_are_refused_for_dpo(tmp_path: Path, tok) -> None:
    row = {"prompt": "Tell me a story.", "completion": "A cat sat.", "label": False}
    with pytest.raises(DataError, match=r"train.json:1: a labelled completion .* Use stage=kto"):
        build(tmp_path, [row], tok)


# --------------------------------------------------------------------------- bad records


def pcr(prompt: object, chosen: object = None, rejected: object = None) -> dict:
    """A prompt_chosen_rejected record (None: the field is left out)."""
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {k: v for k, v in row.items() if v is not None}


def sr(src: object, response: object, sort: object) -> dict:
    """A src_response (PaddleNLP) record."""
    return {"src": src, "tgt": [], "response": response, "sort": sort}


def turns(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


PCR, SR = "prompt_chosen_rejected", "src_response"
BAD = [
    (pcr("Tell me.", chosen="A cat."), PCR, "field 'rejected' is missing"),
    (pcr("Tell me.", rejected="A cat."), PCR, "field 'chosen' is missing"),
    (sr("Tell me.", ["A cat."], [1, 0]), SR, "field 'sort' must be a list of 1 numbers"),
    (sr("Tell me.", "A cat.", [1, 0]), SR, "field 'response' must be a list of 2 answers"),
    (
        pcr("Tell me.", "A cat sat.", "A cat sat. "),
        PCR,
        "chosen and rejected are the same text: the pair states no preference",
    ),
    (
        sr("Tell me.", ["A cat.", "A dog."], [2, 2]),
        SR,
        r"sort \[2, 2\] ranks both responses equally",
    ),
    (pcr("  ", "A cat.", "A dog."), PCR, "empty prompt: the user message answered is empty"),
    (sr("", ["A cat.", "A dog."], [1, 0]), SR, "empty prompt"),
    (pcr("Tell me.", "", "A dog."), PCR, "empty response: field 'chosen' is empty"),
    (sr(["a", "b"], ["A cat.", "A dog."], [1, 0]), SR, "src holds 2 user turns and tgt 0"),
    (
        {"prompt": "Tell me.", "completion": "A cat.", "label": "yes"},
        "prompt_completion_label",
        "field 'label' must be true",
    ),
    (sr("Tell me.", ["A cat."], [5]), SR, r"one response with sort \[5\]"),
    (
        {"chosen": turns("Tell me.", "A cat."), "rejected": turns("Tell me more.", "A dog.")},
        "chosen_rejected",
        "chosen and rejected differ before their last message",
    ),
    (
        pcr([{"role": "assistant", "content": "Hi"}], "A cat.", "A dog."),
        PCR,
        "do not alternate user/assistant",
    ),
]


@pytest.mark.parametrize(("row", "fmt", "message"), BAD)
def test_every_bad_record_kind_names_file_line_and_reason(
    tmp_path: Path, tok, row: dict, fmt: str, message: str
) -> None:
    good = dict(PAIR) if fmt == "src_response" else None
    rows = [good, row] if good is not None else [row]
    kind = (
        "labelled"
        if fmt == "prompt_completion_label" or row.get("response") == ["A cat."]
        else "pairwise"
    )
    line = len(rows)
    with pytest.raises(DataError, match=rf"train.json:{line}: .*{message}"):
        build(tmp_path, rows, tok, kind=kind, format=fmt)


def test_bad_records_are_skipped_and_counted_on_request(tmp_path: Path, tok) -> None:
    rows = [PAIR, dict(PAIR, response=["Same.", "Same."]), dict(PAIR, sort=[1, 1]), "{broken", PAIR]
    data = build(tmp_path, rows, tok, on_bad_record="skip")
    stats = data.stats.train
    assert len(data.train_dataset) == 2 and stats.records_read == 5
    assert dict(stats.skipped) == {"equal_responses": 1, "equal_ranks": 1, "invalid_json": 1}
    assert any("train.json:2" in s for s in stats.skipped_samples)


# --------------------------------------------------------------------------- truncation


def test_split_budget_lets_the_shorter_response_keep_its_tokens() -> None:
    assert split_budget(10, 20, 40) == (10, 20)
    assert split_budget(10, 50, 40) == (10, 30)  # the short one fits in half: kept whole
    assert split_budget(50, 10, 40) == (30, 10)
    assert split_budget(50, 50, 40) == (20, 20)


def test_truncation_cuts_prompt_left_and_responses_right_and_counts(tmp_path: Path, tok) -> None:
    long_prompt = "Tell me a story about a cat and a dog and a bird and a frog, please, now."
    row = {
        "prompt": long_prompt,
        "chosen": "A cat sat on a mat all day long.",
        "rejected": "A dog.",
    }
    data = build(tmp_path, [row], tok, src_length=8, max_length=18)
    item = data.train_dataset[0]
    prompt = [tok.bos_token_id, *enc(tok, long_prompt)]
    kept_prompt = [prompt[0], *prompt[-7:]]  # bos kept, then the last src_length - 1 tokens
    assert item["input_ids"][:7].tolist() == kept_prompt[:-1]
    assert len(item["input_ids"]) == 18
    s1, s2, e, _ = item["bounds"][0].tolist()
    rejected = enc(tok, "A dog.") + [tok.eos_token_id]
    assert item["targets"][s2:e].tolist() == rejected  # the short response keeps its eos
    chosen = enc(tok, "A cat sat on a mat all day long.")
    assert item["targets"][s1:s2].tolist() == chosen[: s2 - s1]  # cut: no eos
    stats = data.stats.train
    assert (stats.truncated_prompt, stats.truncated_target) == (1, 1)
    with pytest.raises(DataError, match="train.json:1: preference record is too long"):
        build(tmp_path, [row], tok, src_length=8, max_length=16, overlong="error")
    with pytest.raises(DataError, match=r"train split is empty: .* 1 dropped as overlong"):
        build(tmp_path, [row], tok, src_length=8, max_length=16, overlong="drop")


def test_chat_template_renders_prompt_and_responses(tmp_path: Path, tok) -> None:
    data = build(tmp_path, [PAIR], tok, chat_template="chatml")
    item = data.train_dataset[0]
    s1, s2, e, _ = item["bounds"][0].tolist()
    text = tok.decode(item["input_ids"][: s1 + 1].tolist())
    assert "user" in text and "assistant" in text
    assert tok.decode(item["targets"][s1:s2].tolist()).startswith("A cat sat.")


def test_packing_puts_several_pairs_in_one_row(tmp_path: Path, tok) -> None:
    data = build(tmp_path, [PAIR] * 6, tok, packing="zero_padding", max_length=128, src_length=64)
    assert len(data.train_dataset) < 6
    batch = data.collate_fn([data.train_dataset[0]])
    rows = batch["response_indexs"]
    assert len(rows) > 1 and (rows[:, 0] == 0).all()
    first, second = rows[0].tolist(), rows[1].tolist()
    # The second pair's tokens never see the first pair's.
    assert not batch["attention_mask"][0, second[1] :, : first[3]].any()


def test_demo_preferences_read_as_pairs_with_entities(tok) -> None:
    config = DataConfig(
        name="d",
        path=str(asset_path("demo_preferences")),
        format="auto",
        max_length=256,
        src_length=64,
    )
    data = build_preference_data(config, tok, kind="pairwise", seed=0, need_dev=True)
    assert (len(data.train_dataset), len(data.dev_dataset)) == (2000, 48)
    assert data.stats.train.truncated_target == 0 and data.stats.train.truncated_prompt == 0
    assert data.dev_records[0]["entities"] == ["Amy", "duck", "white bag"]
    assert data.dev_records[0]["src"].startswith("Please write a short story.")
