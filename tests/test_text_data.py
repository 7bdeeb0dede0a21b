"""Pretraining-style text: the text and autoregressive formats, blocks, document masks,
pieces, streaming, bad records and the shipped demo text."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from ftlab.assets import asset_path
from ftlab.config.schema import DataConfig
from ftlab.data.build import build_data
from ftlab.data.collate import FLASHMASK_KEY
from ftlab.data.examples import IGNORE
from ftlab.data.formats import Document
from ftlab.data.packing import GREEDY_WINDOW
from ftlab.data.records import BadRecords
from ftlab.data.stats import SplitStats
from ftlab.data.text import DocumentBuilder
from ftlab.demo import make_text
from ftlab.errors import DataError

SHIPPED = asset_path("demo_text")
BOS, EOS = 1, 2


class DigitEncoder:
    """Token ids are the words themselves: every count below can be checked by hand."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[int(w) for w in t.split()] for t in texts]


class DigitTokenizer:
    bos_token_id, eos_token_id = BOS, EOS


def random_docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(map(str, rng.integers(10, 99, rng.integers(1, 30)))) for _ in range(n)]


def rows(docs: list[str], width: int, layout: str) -> tuple[list, SplitStats]:
    stats = SplitStats()
    builder = DocumentBuilder(DigitTokenizer(), width, layout, encoder=DigitEncoder())
    items = ((Document(d), f"f:{i}") for i, d in enumerate(docs))
    return list(builder.build(items, stats, BadRecords("error", stats))), stats


def stream_of(docs: list[str]) -> np.ndarray:
    return np.concatenate([[BOS, *map(int, d.split()), EOS] for d in docs])


@pytest.mark.parametrize("width", [5, 16, 64])
def test_blocks_cut_the_stream_and_label_every_token_once(width: int) -> None:
    docs = random_docs()
    stream = stream_of(docs)
    blocks, stats = rows(docs, width, "blocks")
    assert all(len(b.input_ids) == width for b in blocks[:-1]) and len(blocks[-1].input_ids)
    assert np.array_equal(np.concatenate([b.input_ids for b in blocks]), stream[:-1])
    assert np.array_equal(np.concatenate([b.labels for b in blocks]), stream[1:])
    assert all(b.seq_lens is None for b in blocks)
    assert stats.documents == 40 and stats.tokens == stats.target_tokens == len(stream) - 1
    assert 0 < stats.documents_split < 40


def test_document_blocks_mask_documents_from_each_other() -> None:
    docs = random_docs()
    stream = stream_of(docs)
    blocks, stats = rows(docs, 16, "document_blocks")
    assert np.array_equal(np.concatenate([b.input_ids for b in blocks]), stream[:-1])
    labels = np.concatenate([b.labels for b in blocks])
    crossing = stream[1:] == BOS  # a document's eos predicting the next one's bos
    assert (labels[crossing] == IGNORE).all()
    assert np.array_equal(labels[~crossing], stream[1:][~crossing])
    assert stats.target_tokens == stats.tokens - int(crossing.sum())
    for b in blocks:
        assert int(b.seq_lens.sum()) == len(b.input_ids)
        starts = np.cumsum(b.seq_lens)[:-1]
        assert (b.input_ids[starts] == BOS).all()  # each later segment begins a document


def test_pieces_cut_only_documents_longer_than_a_row() -> None:
    docs = random_docs()
    pieces, stats = rows(docs, 16, "pieces")
    lengths = [len(d.split()) + 2 for d in docs]
    assert len(pieces) == sum(-(-(n - 1) // 16) for n in lengths)
    assert stats.documents_split == sum(n - 1 > 16 for n in lengths)
    assert stats.tokens == stats.target_tokens == sum(n - 1 for n in lengths)
    assert all(p.input_ids[0] == BOS for p in pieces[:1])


def write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def small_text(tmp_path: Path) -> Path:
    train = [json.loads(x) for x in (SHIPPED / "train.json").read_text().splitlines()[:6]]
    dev = [json.loads(x) for x in (SHIPPED / "dev.json").read_text().splitlines()[:2]]
    write(tmp_path / "train.json", train)
    write(tmp_path / "dev.json", dev)
    return tmp_path


def build(path: Path, tok, **overrides):
    cfg = DataConfig(name="t", path=str(path), **overrides)
    return build_data(cfg, tok, seed=0, need_dev=True, max_steps=overrides.get("_steps"))


def test_text_format_is_detected_and_packing_chooses_the_rows(tmp_path: Path, tok) -> None:
    path = small_text(tmp_path)
    plain = build(path, tok, max_length=128, src_length=64)
    assert plain.format == "text" and plain.stats.train.documents == 6
    first = plain.train_dataset[0]
    assert set(first) == {"input_ids", "labels"} and len(first["input_ids"]) == 128
    assert first["input_ids"][0] == tok.bos_token_id
    batch = plain.collate_fn([plain.train_dataset[i] for i in range(2)])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    masked = build(path, tok, max_length=128, src_length=64, packing="zero_padding")
    assert len(masked.train_dataset) == len(plain.train_dataset)
    st = masked.stats.train  # every block full but the last
    assert st.packs == len(masked.train_dataset)
    assert st.tokens == 128 * (st.packs - 1) + len(masked.train_dataset[st.packs - 1]["labels"])
    flash = build(path, tok, max_length=128, src_length=64, packing="greedy")
    assert flash.stats.train.packs is not None
    # dev: each document alone, one piece a row, whatever the train packing
    assert len(masked.dev_dataset) == len(plain.dev_dataset) == len(flash.dev_dataset)
    assert "seq_lens" not in masked.dev_dataset[0]


def test_autoregressive_format_reads_src_documents(tmp_path: Path, tok) -> None:
    write(tmp_path / "train.json", [{"src": "Once upon a time."}, {"src": "The end."}])
    data = build_data(
        DataConfig(name="t", path=str(tmp_path), format="autoregressive", max_length=64),
        tok,
        seed=0,
        need_dev=False,
    )
    assert data.stats.train.documents == 2
    write(tmp_path / "train.json", [{"src": "Once upon a time."}])
    with pytest.raises(DataError, match="none of the first 1 records fits a format"):
        build_data(DataConfig(name="t", path=str(tmp_path)), tok, seed=0, need_dev=False)


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"body": "x"}, "text", r"train.json:2: record does not match data.format=text: field "
         r"'text' must be a string, found missing"),
        ({"text": "   "}, "text", r"train.json:2: empty document: field 'text' is empty"),
        ({"text": 3}, "text", r"train.json:2: .*field 'text' must be a string, found a int"),
        ({"src": "a", "tgt": "b"}, "autoregressive", r"train.json:2: .*also has tgt"),
    ],
)  # fmt: skip
def test_bad_text_records_name_file_and_line(tmp_path: Path, tok, row, fmt, message) -> None:
    key = "src" if fmt == "autoregressive" else "text"
    write(tmp_path / "train.json", [{key: "A good document."}, row, {key: "Another one."}])
    cfg = DataConfig(name="t", path=str(tmp_path), format=fmt, max_length=64)
    with pytest.raises(DataError, match=message):
        build_data(cfg, tok, seed=0, need_dev=False)
    skipping = DataConfig(
        name="t", path=str(tmp_path), format=fmt, max_length=64, on_bad_record="skip"
    )
    data = build_data(skipping, tok, seed=0, need_dev=False)
    assert data.stats.train.documents == 2 and sum(data.stats.train.skipped.values()) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ({"chat_template": "chatml"}, "text records are documents, not conversations"),
        ({"overlong": "drop"}, "nothing is truncated or dropped"),
    ],
)
def test_settings_without_meaning_for_text_are_refused(tmp_path: Path, tok, override, message):
    path = small_text(tmp_path)
    with pytest.raises(DataError, match=message):
        build(path, tok, max_length=128, src_length=64, **override)  # format detected
    with pytest.raises(DataError, match=message):
        build(path, tok, max_length=128, src_length=64, format="text", **override)


@pytest.mark.parametrize("packing", ["none", "zero_padding"])
def test_streaming_text_yields_the_map_rows(tmp_path: Path, tok, packing: str) -> None:
    path = small_text(tmp_path)
    common = dict(max_length=128, src_length=64, packing=packing, shuffle=False)
    eager = build(path, tok, **common)
    lazy = build_data(
        DataConfig(name="t", path=str(path), streaming=True, **common),
        tok,
        seed=0,
        need_dev=True,
        max_steps=5,
    )
    expected = [eager.train_dataset[i] for i in range(len(eager.train_dataset))]
    got = list(islice(iter(lazy.train_dataset), len(expected)))
    for a, b in zip(expected, got, strict=True):
        assert set(a) == set(b)
        for k in a:
            assert np.array_equal(a[k], b[k])


def first_pass(stream) -> list[dict]:
    """The items of an (endless) stream's first pass over its files."""
    items = []
    for item in stream:
        if stream.stats.epochs_started > 1:  # set before the next pass's first item
            return items
        items.append(item)
    raise AssertionError("a stream ended")


def pieces_of(items: list[dict]) -> list[tuple[bytes, bytes]]:
    """Each packed row cut back into its document pieces (ids, labels), sorted."""
    out = []
    for item in items:
        ends = np.cumsum(item["seq_lens"])
        for ids, labels in zip(np.split(item["input_ids"], ends[:-1]),
                               np.split(item["labels"], ends[:-1]), strict=True):  # fmt: skip
            out.append((ids.tobytes(), labels.tobytes()))
    return sorted(out)


def test_streaming_greedy_text_equals_the_map_rows_on_the_demo_text(tok) -> None:
    """Greedy packing of the shipped demo text, streamed vs in memory. At max_length 48 the
    ~5.5k pieces span two packing windows (GREEDY_WINDOW = 4096 pieces), which streaming
    fills as it reads: without shuffling the rows, and their collated FlashMask indices,
    position ids and labels, are identical. With data.shuffle the two differ by design (the
    map set permutes all pieces, the stream shuffles records through a 2048-record buffer
    and packs pieces in window order), but one pass holds the same pieces."""
    common = dict(name="demo_text", path=str(SHIPPED), format="text", max_length=48,
                  packing="greedy")  # fmt: skip
    for shuffle in (False, True):
        cfg = DataConfig(shuffle=shuffle, **common)
        eager = build_data(cfg, tok, seed=0, need_dev=False, flash_mask=True)
        expected = [eager.train_dataset[i] for i in range(len(eager.train_dataset))]
        lazy = build_data(
            DataConfig(shuffle=shuffle, streaming=True, **common),
            tok,
            seed=0,
            need_dev=False,
            max_steps=5,
            flash_mask=True,
        )
        got = first_pass(lazy.train_dataset)
        assert sum(len(x["seq_lens"]) for x in expected) > GREEDY_WINDOW  # two windows
        assert pieces_of(got) == pieces_of(expected)
        if shuffle:
            assert [len(x["input_ids"]) for x in got] != [len(x["input_ids"]) for x in expected]
            continue
        assert len(got) == len(expected)
        for a, b in zip(expected, got, strict=True):
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
        for start in range(0, len(expected), 64):
            batch = [eager.collate_fn(expected[start : start + 64]),
                     lazy.collate_fn(got[start : start + 64])]  # fmt: skip
            assert FLASHMASK_KEY in batch[0] and set(batch[0]) == set(batch[1])
            assert all(np.array_equal(batch[0][k], batch[1][k]) for k in batch[0])


def test_demo_text_is_generated_deterministically(tmp_path: Path) -> None:
    assert make_text.main(["--out", str(tmp_path)]) == 0
    for name in ("train.json", "dev.json"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), (
            f"shipped demo_text/{name} is stale: python -m ftlab.demo.make_text --out "
            "ftlab/assets/demo_text"
        )
    train, dev = make_text.build_splits()
    assert len(train) == 240 and len(dev) == 24
    intro = re.compile(r"named (\w+)\..* best friend was (\w+) the .* had a \w+ (\w+) that")

    def combo(doc: dict) -> tuple[str, ...]:
        return intro.search(doc["text"].split("\n\n")[0]).groups()

    assert not {combo(d) for d in dev} & {combo(d) for d in train}
