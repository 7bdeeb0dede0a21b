"""The shipped stories260K checkpoint: a correct, reproducible conversion of llama2.c's model.

The expected pieces and text come from llama2.c's published tokenizer behaviour and greedy
sample (listed in the input's PROVENANCE.md); a conversion error in the RoPE permutation,
the weight transposes, the dequantisation or the tokenizer model changes them.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest

from ftlab.assets import asset_path
from ftlab.convert.llama2c import OUTPUT_FILES, convert_llama2c, main
from ftlab.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "ftlab" / "assets" / "stories260k"
INPUTS = REPO.parent / "shared" / "assets" / "stories260k"
MODEL_BIN = INPUTS / "stories260K_q80.bin"
TOKENIZER_BIN = INPUTS / "tok512.bin"

needs_inputs = pytest.mark.skipif(
    not (MODEL_BIN.is_file() and TOKENIZER_BIN.is_file()),
    reason=f"llama2.c inputs not present at {INPUTS}",
)

SENTENCE = "Once upon a time, there was a little girl named Lily."
SENTENCE_PIECES = [
    "<s>", "\u2581Once", "\u2581upon", "\u2581a", "\u2581time", ",", "\u2581there", "\u2581was",
    "\u2581a", "\u2581little", "\u2581g", "ir", "l", "\u2581named", "\u2581Lily", ".",
]  # fmt: skip
# Upstream's greedy sample from BOS, first 44 tokens (int8 weights drift only after ~45).
GREEDY_44 = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball."
)


@pytest.fixture(scope="module")
def tokenizer():
    from paddlenlp.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHIPPED))


@pytest.fixture(scope="module")
def model():
    from paddlenlp.transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(SHIPPED))
    m.eval()
    return m


def test_asset_path_resolves_the_shipped_checkpoint() -> None:
    assert asset_path("stories260k") == SHIPPED
    with pytest.raises(FileNotFoundError, match=r"no shipped asset named 'nope'.*stories260k"):
        asset_path("nope")
    with pytest.raises(FileNotFoundError):
        asset_path("../assets")


def test_tokenizer_pieces_special_tokens_and_round_trip(tokenizer) -> None:
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == SENTENCE_PIECES
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE


def test_model_has_260032_parameters_with_tied_head(model) -> None:
    # The head is the embedding parameter itself, so it is counted once: 512*64 embedding
    # + 5 layers * (2*64 norms + 64*64 q + 2*64*32 k,v + 64*64 o + 3*64*172 MLP) + 64 norm.
    assert model.lm_head.weight is model.llama.embed_tokens.weight
    assert sum(int(p.numel()) for p in model.parameters()) == 260_032


def test_greedy_generation_from_bos_matches_upstream_sample(model, tokenizer) -> None:
    import paddle

    bos = paddle.to_tensor([[tokenizer.bos_token_id]], dtype="int64")
    out, _ = model.generate(
        input_ids=bos,
        attention_mask=paddle.ones_like(bos),
        max_new_tokens=44,
        decode_strategy="greedy_search",
    )
    assert tokenizer.decode(out[0].tolist(), skip_special_tokens=True) == GREEDY_44


def test_provenance_lists_the_sha256_of_every_shipped_file() -> None:
    text = (SHIPPED / "PROVENANCE.md").read_text()
    listed = dict(re.findall(r"^\| `?([\w.]+)`? \| \d+ \| ([0-9a-f]{64}) \|", text, re.M))
    for name in OUTPUT_FILES:
        assert listed.get(name) == hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest(), name
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(
        [*OUTPUT_FILES, "PROVENANCE.md", "LICENSE"]
    )


@needs_inputs
def test_converter_reproduces_the_shipped_files_byte_for_byte(tmp_path: Path) -> None:
    assert main(["--model", str(MODEL_BIN), "--tokenizer", str(TOKENIZER_BIN),
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUT_FILES)
    for name in OUTPUT_FILES:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def _llama2c_encode(text: str, pieces: list[str], scores: list[float]) -> list[int]:
    """llama2.c's own encoder (run.c): dummy space, per-character lookup with byte
    fallback, then repeatedly merge the adjacent pair whose merged piece scores best."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    ids = [lookup[" "]] if text else []
    for ch in text:
        ids.extend([lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode("utf-8")])
    while True:
        best = None
        for i in range(len(ids) - 1):
            merged = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if merged is not None and (best is None or scores[merged] > scores[best[1]]):
                best = (i, merged)
        if best is None:
            return ids
        ids[best[0] : best[0] + 2] = [best[1]]


@needs_inputs
def test_sentencepiece_model_encodes_like_llama2c(tokenizer) -> None:
    data = TOKENIZER_BIN.read_bytes()
    pieces, scores, offset = [], [], 4
    for _ in range(512):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length].decode("utf-8"))
        scores.append(score)
        offset += 8 + length
    # Repeated and edge spaces (no whitespace collapsing), newlines, digits, characters
    # outside the vocabulary (byte fallback) and inside it (U+201C, U+2026).
    for text in [
        SENTENCE,
        "Hello  world   with   spaces ",
        '  Tom said, "Let\'s go!"\nThen they went home.\n\nThe end.',
        "Numbers 12345 and 2023!",
        "Caf\u00e9 na\u00efve \U0001f600 \u201cquotes\u201d \u2026",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == _llama2c_encode(text, pieces, scores), text
        assert tokenizer.decode(ids) == text, text


def test_converter_rejects_a_file_that_is_not_a_llama2c_export(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"GGUF" + bytes(300))
    with pytest.raises(ModelLoadError, match=r"model\.bin.*magic 0x46554747.*--version 2"):
        convert_llama2c(bogus, tmp_path / "tok.bin", tmp_path / "out")
    assert main(["--model", str(bogus), "--tokenizer", "t", "--out", str(tmp_path / "o")]) == 2
    assert "magic" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
