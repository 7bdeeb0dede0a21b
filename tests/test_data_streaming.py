"""Streaming: lazy, endless, sharded by rank, resumable by skipping consumed items."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from ftlab.config.schema import DataConfig
from ftlab.data.build import build_data
from ftlab.errors import DataError

N = 30


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """Two train files (N records in all, record k says 'number k') and a dev file."""
    rows = [{"src": f"Say number {k}.", "tgt": f"Number {k} is here.", "k": k} for k in range(N)]
    (tmp_path / "train").mkdir()
    for name, part in (("a.json", rows[:12]), ("b.json", rows[12:])):
        (tmp_path / "train" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "dev.json").write_text(json.dumps(rows[0]) + "\n")
    return tmp_path


def stream(tok, path: Path, world_size: int = 1, rank: int = 0, **overrides):
    cfg = DataConfig(name="t", path=str(path), streaming=True, **overrides)
    return build_data(
        cfg, tok, seed=0, need_dev=True, max_steps=10, world_size=world_size, rank=rank
    )


def keys(items) -> list[tuple[int, ...]]:
    return [tuple(it["input_ids"].tolist()) for it in items]


def test_streaming_yields_what_the_map_dataset_holds(tok, corpus):
    data = stream(tok, corpus, shuffle=False)
    cfg = DataConfig(name="t", path=str(corpus), shuffle=False)
    eager = build_data(cfg, tok, seed=0, need_dev=True)
    first_pass = list(islice(iter(data.train_dataset), N))
    assert keys(first_pass) == keys(eager.train_dataset[i] for i in range(N))
    assert len(data.dev_dataset) == 1 and data.format == "src_tgt"
    with pytest.raises(TypeError, match="a streaming dataset has no length"):
        len(data.train_dataset)
    assert len(data.fingerprints) == 3


def test_stream_is_endless_and_reshuffled_per_pass(tok, corpus):
    data = stream(tok, corpus)
    items = keys(islice(iter(data.train_dataset), 2 * N))
    first, second = items[:N], items[N:]
    assert sorted(first) == sorted(second) and first != second
    assert data.stats.train.epochs_started == 2 and data.stats.train.examples == 2 * N
    again = keys(islice(iter(stream(tok, corpus).train_dataset), 2 * N))
    assert again == items  # seeded


def test_ranks_get_disjoint_shares(tok, corpus):
    shares = [keys(islice(iter(stream(tok, corpus, 3, r).train_dataset), N // 3)) for r in range(3)]
    everything = keys(islice(iter(stream(tok, corpus).train_dataset), N))
    assert sorted(shares[0] + shares[1] + shares[2]) == sorted(everything)
    assert all(len(set(s)) == N // 3 for s in shares)


def test_skip_examples_resumes_where_the_run_stopped(tok, corpus):
    reference = keys(islice(iter(stream(tok, corpus).train_dataset), 40))
    resumed = stream(tok, corpus).train_dataset
    resumed.skip_examples(17)
    assert keys(islice(iter(resumed), 23)) == reference[17:]


def test_streaming_packs_fit_max_length(tok, corpus):
    data = stream(tok, corpus, packing="greedy", max_length=64, src_length=16)
    packs = list(islice(iter(data.train_dataset), 8))
    assert all(
        len(p["input_ids"]) <= 64 and p["seq_lens"].sum() == len(p["input_ids"]) for p in packs
    )
    batch = data.collate_fn(packs[:2])
    assert batch["attention_mask"].ndim == 3
    assert data.stats.train.packs == 8 and 0 < data.stats.train.packing_efficiency <= 1


def test_bad_record_in_the_stream_names_its_line(tok, corpus):
    with open(corpus / "train" / "b.json", "a") as f:
        f.write('{"src": "x", "tgt": ""}\n')
    data = stream(tok, corpus, shuffle=False)
    with pytest.raises(DataError, match=r"b.json:19: empty target: field 'tgt' is empty"):
        list(islice(iter(data.train_dataset), N))
    skipping = stream(tok, corpus, shuffle=False, on_bad_record="skip")
    assert len(list(islice(iter(skipping.train_dataset), N))) == N
    assert dict(skipping.stats.train.skipped) == {"empty_target": 1}


def test_streaming_refusals(tok, corpus):
    cfg = DataConfig(name="t", path=str(corpus), streaming=True)
    with pytest.raises(DataError, match=r"data.streaming=true needs train.max_steps > 0"):
        build_data(cfg, tok, seed=0, need_dev=True, max_steps=None)
    cfg = DataConfig(name="t", path=str(corpus), streaming=True, dev_from_train=0.1)
    with pytest.raises(DataError, match=r"cannot carve data.dev_from_train out of a stream"):
        build_data(cfg, tok, seed=0, need_dev=True, max_steps=5)
    (corpus / "train" / "a.json").write_text("")
    (corpus / "train" / "b.json").write_text("\n")
    with pytest.raises(DataError, match=r"the train split is empty"):
        stream(tok, corpus)


def test_dataloader_batches_a_stream(tok, corpus):
    import paddle

    data = stream(tok, corpus, packing="zero_padding", max_length=96, src_length=16)
    loader = paddle.io.DataLoader(data.train_dataset, batch_size=2, collate_fn=data.collate_fn)
    batch = next(iter(loader))
    assert batch["attention_mask"].shape[0] == 2 and batch["attention_mask"].ndim == 3
    assert np.all(batch["position_ids"].numpy()[:, 0] == 0)
