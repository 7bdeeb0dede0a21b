"""Weighted data mixtures (``data.sources``): realised shares, seeded order, per-source
reading rules and accounting, streaming, and every refusal with its message."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import CPU, compose_run

from ftlab.errors import ConfigError, DataError
from ftlab.resolve.validate import validate


def write(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source a: 1,500 src/tgt records; source b: 300 Alpaca records with one broken line;
    both with a dev split."""
    root = tmp_path_factory.mktemp("mix")
    write(root / "a/train.json", [{"src": f"apple {i}", "tgt": f"red {i}"} for i in range(1500)])
    write(root / "a/dev.json", [{"src": f"apple q{i}", "tgt": f"red {i}"} for i in range(4)])
    rows: list[Any] = [{"instruction": f"berry {i}", "output": f"blue {i}"} for i in range(300)]
    rows.insert(7, "{not json")
    write(root / "b/train.json", rows)
    write(root / "b/dev.json", [{"instruction": f"berry q{i}", "output": "blue"} for i in range(3)])
    return root


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from ftlab.models.loading import load_tokenizer

    return load_tokenizer(compose_run([]).model)


def mixture(root: Path, *extra: str, weights: tuple[float, float] = (0.75, 0.25)) -> Any:
    return compose_run(
        [
            "data=mixture",
            f"data.sources=[{{path:{root}/a,weight:{weights[0]}}},"
            f"{{path:{root}/b,weight:{weights[1]},on_bad_record:skip}}]",
            *extra,
        ]
    )


def first_word(tokenizer: Any, item: dict, start: int = 0) -> str:
    """The source of an example: its prompt starts with "apple" (a) or "berry" (b)."""
    text = tokenizer.decode([int(x) for x in item["input_ids"][start + 1 : start + 6]])
    word = text.split()[0]
    assert word in ("apple", "berry"), text
    return word


def build(run: Any, tokenizer: Any, seed: int = 0, **kw: Any) -> Any:
    from ftlab.data.build import build_data

    return build_data(run.data, tokenizer, seed=seed, need_dev=True, **kw)


def test_shares_order_and_accounting(sources: Path, tokenizer: Any) -> None:
    run = mixture(sources)
    assert validate(run, CPU)["mixture_weights"] == {"a": 0.75, "b": 0.25}
    bundle = build(run, tokenizer)
    data = bundle.train_dataset
    assert len(data) == 1800  # a mixture epoch: as many examples as the sources hold
    names = [first_word(tokenizer, data[i]) for i in range(len(data))]
    counts = Counter(names[:2000])
    assert counts["apple"] / 1800 == pytest.approx(0.75, abs=0.02)
    assert counts["berry"] / 1800 == pytest.approx(0.25, abs=0.02)
    # Every prefix is within one example of the weights (the deal), not only the whole.
    for k in (8, 100, 999):
        assert abs(names[:k].count("berry") - 0.25 * k) <= 1
    # Same seed, same order; another seed, another order.
    again = build(run, tokenizer).train_dataset
    assert all(np.array_equal(data[i]["input_ids"], again[i]["input_ids"]) for i in range(200))
    other = build(run, tokenizer, seed=1).train_dataset
    assert any(not np.array_equal(data[i]["input_ids"], other[i]["input_ids"]) for i in range(50))

    stats = bundle.stats.to_dict()
    a, b = stats["sources"]
    assert (a["name"], a["format"], b["format"]) == ("a", "src_tgt", "alpaca")
    assert (a["drawn"], b["drawn"]) == (1350, 450) and b["share"] == 0.25
    assert b["passes"] == 1.5 and a["passes"] == 0.9  # b repeats, a is subsampled
    assert b["split"]["records_skipped"] == 1 and b["on_bad_record"] == "skip"
    assert "b/train.json:8" in b["split"]["skipped_samples"][0]
    assert a["drawn_tokens"] > 0 and a["token_share"] + b["token_share"] == pytest.approx(1)
    assert len({a["fingerprint"], b["fingerprint"]}) == 2 and len(bundle.fingerprints) == 4
    assert stats["train"]["examples"] == 1800 and stats["train"]["records_read"] == 1801
    assert (a["dev_examples"], b["dev_examples"]) == (4, 3) and len(bundle.dev_dataset) == 7
    items = bundle.generation_items()
    assert [i.source for i in items] == ["a"] * 4 + ["b"] * 3
    assert items[4].reference == "blue"


def test_packing_after_mixing(sources: Path, tokenizer: Any) -> None:
    bundle = build(mixture(sources, "data.packing=greedy"), tokenizer)
    stats = bundle.stats.to_dict()
    assert stats["train"]["packs"] == len(bundle.train_dataset) < 1800
    words = Counter()
    for i in range(len(bundle.train_dataset)):
        item = bundle.train_dataset[i]
        starts = np.cumsum([0, *item["seq_lens"][:-1]])
        words.update(first_word(tokenizer, item, int(s)) for s in starts)
    assert (words["apple"], words["berry"]) == (1350, 450)  # packing keeps every example


def test_streaming_mixture_shares(sources: Path, tokenizer: Any) -> None:
    run = mixture(sources, "data.streaming=true", "train.max_steps=10")
    bundle = build(run, tokenizer, max_steps=10)
    stream = iter(bundle.train_dataset)
    counts = Counter(first_word(tokenizer, next(stream)) for _ in range(2000))
    assert counts["apple"] / 2000 == pytest.approx(0.75, abs=0.02)
    assert counts["berry"] / 2000 == pytest.approx(0.25, abs=0.02)
    drawn = {s.name: s.drawn for s in bundle.stats.sources}
    assert drawn == {"a": counts["apple"], "b": counts["berry"]}


def test_each_source_keeps_its_own_rules(sources: Path, tokenizer: Any) -> None:
    """Without on_bad_record=skip on source b, its broken line stops the run, named."""
    run = compose_run(
        [
            "data=mixture",
            f"data.sources=[{{path:{sources}/a}},{{path:{sources}/b,name:berries}}]",
        ]
    )
    with pytest.raises(DataError, match=r"data.sources\[berries\]: .*b/train.json:8: not valid"):
        build(run, tokenizer)
    tmpl = compose_run(
        [
            "data=mixture",
            f"data.sources=[{{path:{sources}/a,chat_template:chatml}},"
            f"{{path:{sources}/b,on_bad_record:skip}}]",
        ]
    )
    parts = build(tmpl, tokenizer).parts
    assert parts["a"].stats.chat_template == "chatml" and parts["b"].stats.chat_template is None


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.sources=[{path:x}]"], r"data.sources \(a mixture of 1\) with data.path="),
        (["data=mixture", "data.sources=[{path:x,weight:0}]"], "weight=0.0 must be a positive"),
        (["data=mixture", "data.sources=[{path:x},{path:y/x}]"], "name\\(s\\) x are used by more"),
        (["data=mixture", "data.sources=[{path:x,format:csv}]"], r"data.sources\[x\].format='csv'"),
        (["data=mixture", "data.sources=[]"], "data.path is null and data.sources is empty"),
    ],
)
def test_invalid_mixtures_fail_with_their_message(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(compose_run(overrides), CPU)


def test_no_dev_split_in_any_source(sources: Path, tokenizer: Any, tmp_path: Path) -> None:
    write(tmp_path / "c/train.json", [{"src": "x", "tgt": "y"}] * 3)
    run = compose_run(["data=mixture", f"data.sources=[{{path:{tmp_path}/c}}]"])
    with pytest.raises(DataError, match="no source of data.sources has one"):
        build(run, tokenizer)
    cfg = dataclasses.replace(run.data, dev_from_train=0.34)
    from ftlab.data.build import build_data

    bundle = build_data(cfg, tokenizer, seed=0, need_dev=True)
    assert bundle.stats.to_dict()["sources"][0]["dev_examples"] == 1
