"""Data layout, formats and bad input: every problem is a DataError naming file, line, setting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ftlab.assets import asset_path
from ftlab.config.schema import DataConfig
from ftlab.data.build import build_data
from ftlab.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
GOOD = {"src": "Tell me a story about a cat.", "tgt": "Once upon a time, a cat sat."}


def write_lines(path: Path, rows: list) -> Path:
    """JSON lines; a str row is written as is (for broken lines), bytes as raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return path


def build(path: Path, tok, need_dev: bool = False, **overrides):
    cfg = DataConfig(name="t", path=str(path), **overrides)
    return build_data(cfg, tok, seed=0, need_dev=need_dev)


# ---------------------------------------------------------------- fixtures and formats


def test_advertisegen_fixture_src_tgt(tok):
    data = build(FIXTURES / "advertisegen", tok, need_dev=True, max_length=256, src_length=128)
    assert data.format == "src_tgt"
    assert (len(data.train_dataset), len(data.dev_dataset)) == (20, 5)
    assert data.stats.train.records_read == 20 and data.stats.dev.records_read == 5
    assert data.dev_records[0]["src"].startswith("类型#上衣*材质#牛仔布")
    for name in ("train.json", "dev.json"):
        path = (FIXTURES / "advertisegen" / name).resolve()
        assert data.fingerprints[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_alpaca_fixture_keeps_extra_keys(tok):
    data = build(FIXTURES / "alpaca_seed", tok, need_dev=True)
    assert data.format == "alpaca"
    assert (len(data.train_dataset), len(data.dev_dataset)) == (48, 12)
    assert data.dev_records[0]["id"] == "seed_task_48"
    assert set(data.dev_records[0]) == {"instruction", "input", "output", "id", "name"}


def test_demo_dev_records_keep_entities(tok):
    data = build(asset_path("demo_stories"), tok, need_dev=True)
    assert all(isinstance(r["entities"], list) for r in data.dev_records)
    assert len(data.dev_records) == len(data.dev_dataset)


@pytest.mark.parametrize(
    "row, fmt",
    [
        (GOOD, "src_tgt"),
        ({"src": ["hi", "and then?"], "tgt": ["hello", "the end"]}, "src_tgt"),
        ({"instruction": "Say hi.", "input": "", "output": "Hi."}, "alpaca"),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "messages",
        ),
    ],
)
def test_format_auto_detects(tmp_path, tok, row, fmt):
    write_lines(tmp_path / "train.json", [row] * 3)
    assert build(tmp_path, tok).format == fmt


def test_explicit_format_is_checked_against_records(tmp_path, tok):
    write_lines(tmp_path / "train.json", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(
        DataError,
        match=r"train.json:1: record does not match data.format=alpaca"
        r".*Expected fields: instruction \(string\), output",
    ):
        build(tmp_path, tok, format="alpaca")


def test_a_record_of_another_format_names_that_format(tok):
    """The default data option (src_tgt) pointed at Alpaca records: the advice is the
    format setting, not skipping (which would skip every record)."""
    with pytest.raises(DataError) as info:
        build(FIXTURES / "alpaca_seed", tok, format="src_tgt")
    msg = str(info.value)
    assert "train.json:1: record does not match data.format=src_tgt" in msg
    assert "are those of the alpaca format. Set data.format=alpaca (or data.format=auto" in msg
    assert "on_bad_record" not in msg
    # Skipping still counts them, under their own reason.
    with pytest.raises(DataError, match=r"the train split is empty"):
        build(FIXTURES / "alpaca_seed", tok, format="src_tgt", on_bad_record="skip")


def test_format_auto_rejects_unknown_and_ambiguous_records(tmp_path, tok):
    write_lines(tmp_path / "train.json", [{"body": "hello"}])
    with pytest.raises(
        DataError,
        match=r"train.json:1: data.format=auto: none of the first 1 "
        r"records fits a format \(the first has keys \['body'\]\)\. Expected "
        r"fields: src_tgt: src \(string",
    ):
        build(tmp_path, tok)
    write_lines(tmp_path / "train.json", [{**GOOD, "instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"train.json:1: .*several formats \(src_tgt, alpaca\)"):
        build(tmp_path, tok)


def test_layout_split_directories_and_jsonl(tmp_path, tok):
    write_lines(tmp_path / "train" / "a.json", [GOOD] * 2)
    write_lines(tmp_path / "train" / "b.jsonl", [GOOD] * 3)
    write_lines(tmp_path / "train" / "notes.txt", ["ignored"])
    write_lines(tmp_path / "dev.jsonl", [GOOD])
    data = build(tmp_path, tok, need_dev=True)
    assert (len(data.train_dataset), len(data.dev_dataset)) == (5, 1)
    assert data.stats.train.files == 2 and len(data.fingerprints) == 3


def test_explicit_train_and_dev_paths(tmp_path, tok):
    train = write_lines(tmp_path / "x" / "mine.jsonl", [GOOD] * 4)
    dev = write_lines(tmp_path / "y" / "held.jsonl", [GOOD] * 2)
    cfg = DataConfig(name="t", path="", train_path=str(train), dev_path=str(dev))
    data = build_data(cfg, tok, seed=0, need_dev=True)
    assert (len(data.train_dataset), len(data.dev_dataset)) == (4, 2)


# ---------------------------------------------------------------- bad input


def test_invalid_json_line_error_and_skip(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD, '{"src": "a", "tgt": }', GOOD])
    with pytest.raises(
        DataError,
        match=r"train.json:2: not valid JSON: Expecting value at "
        r"column 21\. .*data.on_bad_record=skip",
    ):
        build(tmp_path, tok)
    data = build(tmp_path, tok, on_bad_record="skip")
    assert len(data.train_dataset) == 2
    assert data.stats.train.to_dict()["skipped"] == {"invalid_json": 1}
    assert data.stats.train.skipped_samples[0].endswith(
        "train.json:2: not valid JSON: Expecting value at column 21"
    )


def test_json_array_file_gets_a_hint(tmp_path, tok):
    (tmp_path / "train.json").write_text(json.dumps([GOOD, GOOD], indent=1))
    with pytest.raises(DataError, match=r"train.json:1: not valid JSON.*looks like a JSON array"):
        build(tmp_path, tok)


def test_line_that_is_not_an_object(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD, "[1, 2]"])
    with pytest.raises(
        DataError,
        match=r"train.json:2: expected a JSON object per line, found "
        "a list",
    ):
        build(tmp_path, tok)


def test_missing_field_lists_expected_fields(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD, {"src": "only a prompt"}])
    with pytest.raises(
        DataError,
        match=r"train.json:2: record does not match "
        r"data.format=src_tgt: src and tgt must both be strings or both lists, "
        r"found src=str, tgt=missing\. Expected fields: src \(string, or list"
        r".*the record has keys \['src'\]",
    ):
        build(tmp_path, tok)


def test_wrongly_typed_field(tmp_path, tok):
    write_lines(tmp_path / "train.json", [{"instruction": "Add.", "output": 3}])
    with pytest.raises(
        DataError,
        match=r"train.json:1: record does not match "
        r"data.format=alpaca: field 'output' must be a string, found a int",
    ):
        build(tmp_path, tok)
    write_lines(tmp_path / "train.json", [{"src": ["a", "b"], "tgt": ["c"]}])
    with pytest.raises(DataError, match=r"must be non-empty lists of equal length, found 2 and 1"):
        build(tmp_path, tok)


def test_bad_message_roles(tmp_path, tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    write_lines(tmp_path / "train.json", [{"messages": msgs}])
    with pytest.raises(
        DataError,
        match=r"train.json:1: .*message roles \['user', 'user'\] do "
        "not alternate user/assistant",
    ):
        build(tmp_path, tok)


def test_empty_target_error_and_skip(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD, {"src": "a prompt", "tgt": "  "}, GOOD])
    with pytest.raises(DataError, match=r"train.json:2: empty target: field 'tgt' is empty"):
        build(tmp_path, tok)
    data = build(tmp_path, tok, on_bad_record="skip")
    assert len(data.train_dataset) == 2
    assert dict(data.stats.train.skipped) == {"empty_target": 1}


def test_non_utf8_names_line_and_byte_offset(tmp_path, tok):
    first = json.dumps(GOOD).encode()
    write_lines(tmp_path / "train.json", [first, b'{"src": "caf\xe9", "tgt": "x"}'])
    offset = len(first) + 1 + len(b'{"src": "caf')
    with pytest.raises(
        DataError,
        match=rf"train.json:2: not valid UTF-8 \(byte offset {offset} "
        r"in the file, bytes b'\\xe9\", '\); re-save the file as UTF-8",
    ):
        build(tmp_path, tok)
    data = build(tmp_path, tok, on_bad_record="skip")
    assert dict(data.stats.train.skipped) == {"not_utf8": 1} and len(data.train_dataset) == 1


def test_utf8_bom_and_blank_lines_are_fine(tmp_path, tok):
    body = b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\n   \n" + json.dumps(GOOD).encode()
    (tmp_path / "train.json").write_bytes(body)
    data = build(tmp_path, tok)
    assert len(data.train_dataset) == 2 and data.stats.train.blank_lines == 2


def test_empty_split(tmp_path, tok):
    (tmp_path / "train.json").write_text("\n\n")
    with pytest.raises(
        DataError,
        match=r"the train split is empty: .*train.json hold no "
        r"readable records \(0 read, 0 skipped\)",
    ):
        build(tmp_path, tok)
    write_lines(tmp_path / "train.json", ["{oops"])
    with pytest.raises(DataError, match=r"the train split is empty: .*\(1 read, 1 skipped\)"):
        build(tmp_path, tok, on_bad_record="skip")


def test_missing_directory_and_missing_train(tmp_path, tok):
    with pytest.raises(
        DataError,
        match=r"data.path=.*nope \(data=t\): looked for /.*nope, which does not exist\. Set "
        "data.path to a directory holding train.json",
    ):
        build(tmp_path / "nope", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError,
        match=r"no train split; looked for /.*empty/train.json, /.*empty/train.jsonl, "
        "/.*empty/train/",
    ):
        build(tmp_path / "empty", tok)
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DataError, match=r"directory .*train holds no \*.json or \*.jsonl"):
        build(tmp_path / "empty", tok)


def test_ambiguous_split_layout(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD])
    write_lines(tmp_path / "train" / "part.json", [GOOD])
    with pytest.raises(
        DataError,
        match=r"holds more than one train split: train.json, train\. "
        "Keep one of them",
    ):
        build(tmp_path, tok)


def test_missing_dev_split_says_what_to_do(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD] * 3)
    with pytest.raises(
        DataError,
        match=r"a dev split is needed but .* has none: add dev.json "
        r".*or set data.dev_from_train=0.05",
    ):
        build(tmp_path, tok, need_dev=True)
    assert build(tmp_path, tok, need_dev=False).dev_dataset is None


def test_dev_from_train_is_seeded_and_disjoint(tmp_path, tok):
    rows = [{"src": f"prompt {i}", "tgt": f"answer {i}", "k": i} for i in range(40)]
    write_lines(tmp_path / "train.json", rows)
    cfg = DataConfig(name="t", path=str(tmp_path), dev_from_train=0.1)
    a = build_data(cfg, tok, seed=3, need_dev=True)
    b = build_data(cfg, tok, seed=3, need_dev=True)
    c = build_data(cfg, tok, seed=4, need_dev=True)
    keys = [r["k"] for r in a.dev_records]
    assert len(keys) == 4 and keys == [r["k"] for r in b.dev_records]
    assert keys != [r["k"] for r in c.dev_records]
    assert len(a.train_dataset) == 36 and a.stats.dev_source == "dev_from_train"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"packing": "tight"}, r"data.packing='tight' is not one of none, zero_padding, greedy"),
        ({"overlong": "cut"}, r"data.overlong='cut' is not one of truncate, drop, error"),
        ({"on_bad_record": "warn"}, r"data.on_bad_record='warn' is not one of error, skip"),
        ({"format": "csv"}, r"data.format='csv' is not one of auto, src_tgt, alpaca, messages"),
        (
            {"src_length": 512},
            r"data.src_length=512 must be at least 1 and below "
            r"data.max_length=512",
        ),
        ({"dev_from_train": 1.5}, r"data.dev_from_train=1.5 must be a fraction between 0 and 1"),
        ({"chat_template": "vicuna"}, r"data.chat_template='vicuna' is unknown\. Use null"),
        ({"streaming": True}, r"data.streaming=true needs train.max_steps > 0"),
    ],
)
def test_settings_are_validated(tmp_path, tok, override, message):
    write_lines(tmp_path / "train.json", [GOOD])
    with pytest.raises(DataError, match=message):
        build(tmp_path, tok, **override)


def test_tokenizer_without_pad_or_template(tmp_path):
    from paddlenlp.transformers import AutoTokenizer

    write_lines(tmp_path / "train.json", [GOOD])
    bare = AutoTokenizer.from_pretrained(str(asset_path("stories260k")))
    bare.pad_token = None
    with pytest.raises(DataError, match=r"has no pad token; set model.pad_token"):
        build(tmp_path, bare)
    bare.pad_token = "<unk>"
    with pytest.raises(
        DataError,
        match=r"data.chat_template=tokenizer, but the tokenizer "
        r"\(LlamaTokenizer\) has no chat template",
    ):
        build(tmp_path, bare, chat_template="tokenizer")


def test_overlong_error_names_the_record(tmp_path, tok):
    write_lines(tmp_path / "train.json", [GOOD, {"src": "a b c d e f g h", "tgt": "x " * 50}])
    with pytest.raises(
        DataError,
        match=r"train.json:2: example is too long: \d+ tokens .*"
        r"data.max_length=64 in all\. .*data.overlong=truncate",
    ):
        build(tmp_path, tok, max_length=64, src_length=32, overlong="error")
