"""Packing: pack layout, PaddleNLP parity, the block-diagonal mask and per-example losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers import DEMO, alone_loss, data_for, tiny_model, token_losses

from ftlab.data import packing
from ftlab.data.collate import Collator, count_tokens
from ftlab.data.packing import (
    make_packs,
    pack_best_fit,
    pack_greedy,
    pack_min_slack,
    pack_sequential,
    pack_window,
)
from ftlab.data.watchdog import NoProgressError

FIXTURES = Path(__file__).parent / "fixtures"


def assert_partition(packs: list[list[int]], lengths: list[int], capacity: int) -> None:
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= capacity for p in packs)


def test_sequential_packs_close_when_the_next_example_does_not_fit():
    assert list(pack_sequential([5, 4, 3, 8, 1], 10)) == [[0, 1], [2], [3, 4]]


def test_best_fit_and_min_slack_pack_every_example_once():
    rng = np.random.default_rng(0)
    for lengths in (rng.integers(80, 138, 500).tolist(), rng.integers(5, 300, 500).tolist()):
        for packer in (pack_best_fit, pack_min_slack):
            assert_partition(packer(lengths, 512), lengths, 512)
    # similar lengths, 4-5 a pack: best fit strands a gap that exact fills avoid
    assert len(pack_best_fit([100] * 4 + [130] * 4 + [90] * 2, 512)) == 3
    assert [sorted(p) for p in pack_min_slack([100, 100, 100, 100, 112], 512)] == [[0, 1, 2, 3, 4]]
    lengths = np.random.default_rng(1).integers(80, 138, 250).tolist()
    windows = list(pack_greedy(lengths, 512, window=100))
    assert_partition(windows, lengths, 512)
    assert all(len({i // 100 for i in p}) == 1 for p in windows)  # packs stay in their window


def test_numpy_lengths_take_the_min_slack_path_and_end(monkeypatch):
    """A mixture hands the packer numpy lengths; the exact-fill bitset once stopped growing
    on them and ``pack_min_slack`` spun forever. Lengths 80-137 at 512 leave best fit more
    than 2% off the bound, so ``pack_window`` must take the min-slack path."""
    lengths = np.random.default_rng(0).integers(80, 138, 400)  # numpy int64
    calls = []
    exact = packing.pack_min_slack
    monkeypatch.setattr(packing, "pack_min_slack", lambda *a: calls.append(1) or exact(*a))
    packs = pack_window(lengths, 512)
    assert calls == [1]
    assert_partition(packs, lengths.tolist(), 512)
    bound = -(-int(lengths.sum()) // 512)
    assert bound <= len(packs) < len(pack_best_fit(lengths, 512))  # the exact fills won
    assert_partition(exact(lengths, 512), lengths.tolist(), 512)
    assert_partition(make_packs("greedy", lengths, 512), lengths.tolist(), 512)
    assert_partition(list(pack_sequential(lengths, 512)), lengths.tolist(), 512)


def test_min_slack_that_cannot_progress_raises_instead_of_spinning(monkeypatch):
    monkeypatch.setattr(packing, "_max_fill", lambda counts, free: {})
    with pytest.raises(NoProgressError, match=r"pack_min_slack\) made no progress.*3 examples"):
        pack_min_slack([100, 200, 300], 512)


def test_greedy_on_demo_stories_reaches_095(tok):
    data = data_for(tok, DEMO, max_length=512, src_length=64, packing="greedy")
    stats = data.stats.train
    assert stats.examples == 2000 and stats.tokens == 212827
    assert stats.packs == 425 and stats.packing_efficiency == pytest.approx(0.9781, abs=1e-4)
    lengths = data.train_dataset.store.lengths().tolist()
    assert_partition(data.train_dataset.packs, lengths, 512)
    plain = data_for(tok, DEMO, max_length=512, src_length=64, packing="zero_padding")
    assert plain.stats.train.packs == 480  # in-order packing, for comparison: 0.866


def test_zero_padding_matches_paddlenlp(tok):
    from paddlenlp.datasets import ZeroPaddingMapDataset

    data = data_for(tok, DEMO, max_length=256, src_length=64, packing="zero_padding", shuffle=False)
    store = data.train_dataset.store
    records = [
        {"input_ids": store[i].input_ids.tolist(), "labels": store[i].labels.tolist()}
        for i in range(len(store))
    ]
    theirs = ZeroPaddingMapDataset(records, tok, max_length=256)
    assert len(theirs) == len(data.train_dataset) == 1001
    collate = Collator(tok.pad_token_id)
    for i in range(0, len(theirs), 50):
        ours = collate([data.train_dataset[i]])
        assert ours["input_ids"][0].tolist() == theirs[i]["input_ids"]
        assert ours["labels"][0].tolist() == theirs[i]["labels"]
        assert np.array_equal(ours["attention_mask"], theirs[i]["attention_mask"])


def test_collated_packed_batch_layout():
    items = [
        {
            "input_ids": np.array([5, 6, 7, 8, 9]),
            "labels": np.array([-100, 7, 8, 9, 3]),
            "seq_lens": np.array([2, 3]),
        },
        {
            "input_ids": np.array([4, 4, 4]),
            "labels": np.array([4, 4, -100]),
            "seq_lens": np.array([3]),
        },
    ]
    batch = Collator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, 3], [4, 4, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    assert batch["attention_mask"].dtype == np.bool_
    assert batch["attention_mask"][0].astype(int).tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    mask1 = batch["attention_mask"][1]
    assert mask1[3:].sum() == 0 and mask1[:, 3:].sum() == 0  # padding attends to nothing
    assert count_tokens(batch) == (10, 8)
    as_tensors = {k: paddle.to_tensor(v) for k, v in batch.items()}
    assert count_tokens(as_tensors) == (10, 8)


def test_collated_unpacked_batch_layout():
    items = [
        {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 7, 2])},
        {"input_ids": np.array([4]), "labels": np.array([2])},
    ]
    batch = Collator(pad_token_id=0)(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 2], [2, -100, -100]]
    assert count_tokens(batch) == (6, 4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_batch_gives_each_example_its_own_loss(tok, family):
    data = data_for(tok, DEMO, max_length=512, src_length=64, packing="greedy")
    model = tiny_model(family)
    items = [data.train_dataset[i] for i in range(2)]
    batch = data.collate_fn(items)
    assert batch["attention_mask"].shape == (
        2,
        batch["input_ids"].shape[1],
        batch["input_ids"].shape[1],
    )
    per_token = token_losses(model, batch)
    worst, leak = 0.0, 0.0
    causal = dict(batch, attention_mask=np.ones(batch["input_ids"].shape, dtype=np.int64))
    causal.pop("position_ids")
    leaky = token_losses(model, causal)  # plain causal mask: examples see each other
    for b, item in enumerate(items):
        start = 0
        for n in item["seq_lens"]:
            ids, labels = item["input_ids"][start : start + n], item["labels"][start : start + n]
            packed = np.nanmean(per_token[b, start : start + n])
            worst = max(worst, abs(packed - alone_loss(model, ids, labels)))
            leak = max(leak, abs(np.nanmean(leaky[b, start : start + n]) - packed))
            start += n
    assert worst < 1e-5
    assert leak > 1e-2  # the check would notice cross-example attention


def test_padded_batch_gives_each_example_its_own_loss(tok):
    data = data_for(tok, FIXTURES / "alpaca_seed", max_length=128, src_length=64)
    model = tiny_model("llama")
    items = [data.train_dataset[i] for i in range(3)]
    per_token = token_losses(model, data.collate_fn(items))
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        alone = alone_loss(model, item["input_ids"], item["labels"])
        assert abs(np.nanmean(per_token[b, :n]) - alone) < 1e-5


def test_trainer_runs_packed_batches(tok, tmp_path):
    from paddlenlp.trainer import Trainer, TrainingArguments

    data = data_for(tok, DEMO, max_length=256, src_length=64, packing="greedy")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to=["none"],
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=data.train_dataset,
        data_collator=data.collate_fn,
    )
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
