"""Tokenization: exact ids, the label shift, truncation, templates, fast encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ftlab.assets import asset_path
from ftlab.config.schema import DataConfig
from ftlab.data.build import build_data
from ftlab.data.encoder import TextEncoder, _slow_encode
from ftlab.data.formats import Conversation, Turn
from ftlab.data.templates import NAMED_TEMPLATES, TokenizerTemplate

FIXTURES = Path(__file__).parent / "fixtures"
BOS, EOS, IGNORE = 1, 2, -100
# stories260k ids, encoded without special tokens
SRC = [274, 411, 306, 284, 411, 261, 349, 304, 422, 426]  # "Tell me a story."
TGT = [403, 407, 261, 378, 426]  # "Once upon a time."
RECORD = {"src": "Tell me a story.", "tgt": "Once upon a time."}


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build_one(tmp_path: Path, tok, rows: list[dict], **overrides):
    with open(tmp_path / "train.json", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = DataConfig(name="t", path=str(tmp_path), **overrides)
    return build_data(cfg, tok, seed=0, need_dev=False)


def example(data, i: int = 0) -> tuple[list[int], list[int]]:
    item = data.train_dataset[i]
    return item["input_ids"].tolist(), item["labels"].tolist()


def test_plain_src_tgt_is_bos_src_tgt_eos_shifted(tmp_path, tok):
    seq = [BOS] + SRC + TGT + [EOS]
    ids, labels = example(build_one(tmp_path, tok, [RECORD]))
    assert ids == seq[:-1]
    assert labels == [IGNORE] * len(SRC) + TGT + [EOS]  # position i predicts token i + 1


def test_prompt_cut_from_the_left_keeps_bos(tmp_path, tok):
    data = build_one(tmp_path, tok, [RECORD], src_length=5)
    ids, labels = example(data)
    assert ids == [BOS] + SRC[-4:] + TGT
    assert labels == [IGNORE] * 4 + TGT + [EOS]
    assert (data.stats.train.truncated_prompt, data.stats.train.truncated_target) == (1, 0)


def test_target_cut_from_the_right_without_eos(tmp_path, tok):
    data = build_one(tmp_path, tok, [RECORD], src_length=11, max_length=14)
    ids, labels = example(data)
    assert ids == [BOS] + SRC + TGT[:2]
    assert labels == [IGNORE] * 10 + TGT[:3]  # a cut answer does not end: no eos
    assert (data.stats.train.truncated_prompt, data.stats.train.truncated_target) == (0, 1)


def test_overlong_drop_is_counted(tmp_path, tok):
    short = {"src": "Hi.", "tgt": "Yes."}
    data = build_one(tmp_path, tok, [RECORD, short], max_length=12, src_length=8, overlong="drop")
    assert len(data.train_dataset) == 1 and data.stats.train.dropped_overlong == 1
    assert data.stats.train.examples == 1


def test_multi_turn_loss_only_on_assistant_turns(tmp_path, tok):
    row = {"src": ["Tell me a story.", "More."], "tgt": ["Once upon a time.", "The end."]}
    u2, a2 = enc(tok, "More."), enc(tok, "The end.")
    seq = [BOS] + SRC + TGT + [EOS] + u2 + a2 + [EOS]
    target = [False] * 11 + [True] * 6 + [False] * len(u2) + [True] * (len(a2) + 1)
    ids, labels = example(build_one(tmp_path, tok, [row]))
    assert ids == seq[:-1]
    assert labels == [t if m else IGNORE for t, m in zip(seq[1:], target[1:], strict=True)]


def test_multi_turn_cut_drops_later_turns(tmp_path, tok):
    row = {"src": ["Tell me a story.", "More."], "tgt": ["Once upon a time.", "The end."]}
    data = build_one(tmp_path, tok, [row], max_length=18, src_length=11)
    ids, labels = example(data)
    assert ids == [BOS] + SRC + TGT  # turn 1 with its eos fits; turn 2's prompt has no room
    assert data.stats.train.truncated_target == 1


def test_messages_with_system_plain(tmp_path, tok):
    row = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time."},
        ]
    }
    ids, labels = example(build_one(tmp_path, tok, [row]))
    system = enc(tok, "Be kind.")
    assert ids == [BOS] + system + SRC + TGT
    assert labels == [IGNORE] * (len(system) + len(SRC)) + TGT + [EOS]


def conv(system: str | None = None, user_input: str = "") -> Conversation:
    turns = (Turn("Tell me a story.", "Once upon a time.", user_input), Turn("More.", "The end."))
    return Conversation(system, turns)


def test_named_templates_render_expected_text():
    chatml = NAMED_TEMPLATES["chatml"].pieces(conv("Be kind."))
    assert [(p.text, p.target) for p in chatml] == [
        (
            "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me a story.<|im_end|>"
            "\n<|im_start|>assistant\n",
            False,
        ),
        ("Once upon a time.<|im_end|>", True),
        ("\n<|im_start|>user\nMore.<|im_end|>\n<|im_start|>assistant\n", False),
        ("The end.<|im_end|>", True),
    ]
    assert NAMED_TEMPLATES["qwen2"] is NAMED_TEMPLATES["chatml"]
    llama3 = NAMED_TEMPLATES["llama3"].pieces(Conversation(None, conv().turns[:1]))
    assert [p.text for p in llama3] == [
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a story.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "Once upon a time.<|eot_id|>",
    ]
    alpaca = NAMED_TEMPLATES["alpaca"].pieces(Conversation(None, (Turn("Add.", "3", "1 + 2"),)))
    assert alpaca[0].text == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n"
        "### Response:\n"
    )
    assert NAMED_TEMPLATES["alpaca"].eos_after_target and NAMED_TEMPLATES["llama3"].add_bos
    assert not NAMED_TEMPLATES["llama3"].eos_after_target  # <|eot_id|> ends the answer


def test_chatml_template_labels_cover_answer_and_end_marker(tmp_path, tok):
    data = build_one(tmp_path, tok, [RECORD], chat_template="chatml", max_length=300)
    ids, labels = example(data)
    prompt = enc(tok, "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n")
    answer = enc(tok, "Once upon a time.<|im_end|>")
    assert ids == prompt + answer[:-1]  # chatml adds no bos and no extra eos
    assert labels == [IGNORE] * (len(prompt) - 1) + answer


def test_tokenizer_template_matches_the_named_one(tok):
    from paddlenlp.transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(asset_path("stories260k")))
    own.init_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pieces = TokenizerTemplate(own).pieces(conv("Be kind."))
    named = NAMED_TEMPLATES["chatml"].pieces(conv("Be kind."))
    assert [p.target for p in pieces] == [p.target for p in named]
    # the jinja template ends each turn with "\n", which lands in the answer piece
    assert [p.text for p in pieces] == [
        named[0].text,
        named[1].text + "\n",
        named[2].text[1:],
        named[3].text + "\n",
    ]


def test_fast_encoder_equals_the_tokenizer(tok):
    texts = []
    for name in ("advertisegen/train.json", "alpaca_seed/train.json"):
        for line in (FIXTURES / name).read_text().splitlines():
            r = json.loads(line)
            texts += [r.get("src", r.get("instruction")), r.get("tgt", r.get("output"))]
    texts += ["before <unk> after", "a</s>b", "<s>", "", "  spaces  ", "tab\there\n"]
    encoder = TextEncoder(tok)
    assert encoder.sp is not None  # the sentencepiece batch path is in use
    assert any("<UNK>" in t for t in texts)  # AdvertiseGen's literal marker
    assert encoder.encode(texts) == _slow_encode(tok, texts)


def test_encode_prompt_is_the_training_prefix(tmp_path, tok):
    data = build_one(tmp_path, tok, [RECORD], chat_template="alpaca")
    ids, labels = example(data)
    first_target = next(i for i, x in enumerate(labels) if x != IGNORE)
    assert data.encode_prompt(RECORD) == ids[: first_target + 1]
    assert data.encode_prompt(RECORD)[0] == BOS


def test_cjk_text_round_trips_through_byte_fallback(tok):
    row = json.loads((FIXTURES / "advertisegen" / "dev.json").read_text().splitlines()[0])
    ids = TextEncoder(tok).encode([row["tgt"]])[0]
    assert tok.decode(ids) == row["tgt"]
    assert np.mean(np.asarray(ids) < 259) > 0.9  # mostly byte pieces (<0x..>) in this vocab
