"""Convert a llama2.c Q8_0 checkpoint (export version 2) and its tokenizer to PaddleNLP.

The result is a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load directly (float32 Llama, sentencepiece tokenizer).

Formats (little endian), as written by llama2.c's ``export.py`` / ``tokenizer.py``:

* model (``version2_export``): a 256-byte header (uint32 magic ``ak42``, int32 version 2,
  7 int32 config values, uint8 shared_classifier, int32 group_size, zero padding); float32
  RMSNorm weights (attention, FFN, final); then int8 tensors, each followed by one float32
  scale per group of ``group_size`` consecutive values: token embedding, then wq, wk, wv,
  wo, w1, w2, w3, each for every layer. Matrices are (out_features, in_features).
* tokenizer: int32 max_token_length, then per token: float32 score, int32 byte length,
  UTF-8 bytes (a real space, not U+2581; the control pieces are wrapped in newlines).

The output is a pure function of the input bytes: running the conversion twice gives
byte-identical files, so the shipped checkpoint can be re-derived and checked.

CLI: ``python -m ftlab.convert.llama2c --model M.bin --tokenizer T.bin --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.errors import ConfigError, FtlabError, ModelLoadError

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
VERSION = 2
HEADER_BYTES = 256
# magic, version, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len,
# shared_classifier, group_size; "<" means packed, which is how export.py wrote them.
HEADER_FORMAT = "<Ii7iBi"

# The pad token is the unknown token: the tokenizer has byte fallback, so <unk> is never
# produced when encoding text; padded positions are masked out of attention and loss anyway.
PAD_TOKEN = "<unk>"
PAD_TOKEN_ID = 0

# Files written to the output directory. PaddleNLP's LlamaTokenizer reads its sentencepiece
# model as "sentencepiece.bpe.model"; "tokenizer.model" is the same bytes under the name
# other Llama tooling (sentencepiece, Hugging Face) expects.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPM_FILES = ("sentencepiece.bpe.model", "tokenizer.model")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
OUTPUT_FILES = (CONFIG_FILE, WEIGHTS_FILE, *SPM_FILES, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)

_SPACE = " "
_SPM_SPACE = "\u2581"  # sentencepiece stores spaces inside pieces as U+2581


@dataclass(frozen=True)
class Llama2cConfig:
    """The model shape from a llama2.c header."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool
    group_size: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ModelLoadError(f"{what} file {str(path)!r} does not exist; check the path.")
    return path.read_bytes()


def read_header(data: bytes, source: Path) -> Llama2cConfig:
    """Parse and validate the 256-byte version-2 header."""
    if len(data) < HEADER_BYTES:
        raise ModelLoadError(
            f"{str(source)!r} is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte "
            "llama2.c header. Pass a llama2.c Q8_0 (version 2) export."
        )
    magic, version, *shape, shared, group_size = struct.unpack_from(HEADER_FORMAT, data, 0)
    if magic != MAGIC:
        raise ModelLoadError(
            f"{str(source)!r} starts with magic 0x{magic:08x}, not llama2.c's 0x{MAGIC:08x}. "
            "Pass a llama2.c export written with `export.py --version 2`."
        )
    if version != VERSION:
        raise ModelLoadError(
            f"{str(source)!r} is llama2.c export version {version}; this converter reads "
            f"version {VERSION} (Q8_0). Re-export with `export.py --version 2`."
        )
    cfg = Llama2cConfig(*shape, shared_classifier=bool(shared), group_size=group_size)
    if not cfg.shared_classifier:
        raise ModelLoadError(
            f"{str(source)!r} has a separate output matrix (shared_classifier=0); this "
            "converter handles only models whose output matrix is the token embedding."
        )
    if min(shape) <= 0 or group_size <= 0 or cfg.dim % cfg.n_heads or cfg.head_dim % 2:
        raise ModelLoadError(
            f"{str(source)!r} has an inconsistent header ({cfg}): sizes must be positive and "
            "dim an even multiple of n_heads. The file is corrupt or not a llama2.c export."
        )
    if cfg.n_heads % cfg.n_kv_heads:
        raise ModelLoadError(
            f"{str(source)!r}: n_heads={cfg.n_heads} is not a multiple of "
            f"n_kv_heads={cfg.n_kv_heads}; grouped-query attention needs that."
        )
    return cfg


def _quantized_shapes(cfg: Llama2cConfig) -> list[tuple[str, tuple[int, int]]]:
    """(name, torch-layout shape) of every quantized tensor, in file order."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    shapes = [("tok_embeddings", (cfg.vocab_size, cfg.dim))]
    per_layer = [
        ("wq", (cfg.dim, cfg.dim)),
        ("wk", (kv_dim, cfg.dim)),
        ("wv", (kv_dim, cfg.dim)),
        ("wo", (cfg.dim, cfg.dim)),
        ("w1", (cfg.hidden_dim, cfg.dim)),
        ("w2", (cfg.dim, cfg.hidden_dim)),
        ("w3", (cfg.hidden_dim, cfg.dim)),
    ]
    # Grouped by kind, not by layer: all wq, then all wk, ... (export.py's order).
    for kind, shape in per_layer:
        shapes.extend((f"layers.{layer}.{kind}", shape) for layer in range(cfg.n_layers))
    return shapes


def read_q80_checkpoint(path: Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a Q8_0 export into float32 arrays in llama2.c naming and torch (out, in) layout."""
    data = _read_bytes(path, "the llama2.c model")
    cfg = read_header(data, path)
    n_norm = 2 * cfg.n_layers * cfg.dim + cfg.dim
    shapes = _quantized_shapes(cfg)
    for name, (rows, cols) in shapes:
        if (rows * cols) % cfg.group_size:
            raise ModelLoadError(
                f"{str(path)!r}: tensor {name} has {rows * cols} values, not a multiple of "
                f"group_size={cfg.group_size}; the file cannot be a valid Q8_0 export."
            )
    n_quant = sum(r * c for _, (r, c) in shapes)
    expected = HEADER_BYTES + 4 * n_norm + n_quant + 4 * (n_quant // cfg.group_size)
    if len(data) != expected:
        raise ModelLoadError(
            f"{str(path)!r} is {len(data)} bytes but its header ({cfg}) implies {expected}. "
            "The file is truncated or not a version-2 export with a shared classifier."
        )

    weights: dict[str, np.ndarray] = {}
    offset = HEADER_BYTES
    norms = np.frombuffer(data, dtype="<f4", count=n_norm, offset=offset).astype(np.float32)
    offset += 4 * n_norm
    per_kind = cfg.n_layers * cfg.dim
    attention_norm = norms[:per_kind].reshape(cfg.n_layers, cfg.dim)
    ffn_norm = norms[per_kind : 2 * per_kind].reshape(cfg.n_layers, cfg.dim)
    for layer in range(cfg.n_layers):
        weights[f"layers.{layer}.attention_norm"] = attention_norm[layer].copy()
        weights[f"layers.{layer}.ffn_norm"] = ffn_norm[layer].copy()
    weights["norm"] = norms[2 * per_kind :].copy()

    for name, (rows, cols) in shapes:
        count = rows * cols
        q = np.frombuffer(data, dtype=np.int8, count=count, offset=offset)
        offset += count
        scales = np.frombuffer(data, dtype="<f4", count=count // cfg.group_size, offset=offset)
        offset += 4 * scales.size
        # value = int8 * scale, in float32 exactly as llama2.c's dequantize() computes it.
        values = q.astype(np.float32).reshape(-1, cfg.group_size) * scales[:, None]
        weights[name] = values.astype(np.float32).reshape(rows, cols)
    assert offset == len(data), (offset, len(data))  # guaranteed by the size check above
    return cfg, weights


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection from interleaved to half-split RoPE.

    llama2.c rotates pairs (0,1), (2,3), ... of each head; PaddleNLP's ``rotate_half``
    pairs dimension i with i + head_dim/2. Within each head, new row j takes old row 2j
    and new row head_dim/2 + j takes old row 2j+1, so each rotated pair keeps its frequency.
    Applying the same reorder to q and k leaves every attention score unchanged.
    """
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    per_head = w.reshape(n_heads, head_dim // 2, 2, in_features)
    return per_head.transpose(0, 2, 1, 3).reshape(out_features, in_features)


def to_paddlenlp_state_dict(
    cfg: Llama2cConfig, weights: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rename to PaddleNLP Llama parameters and lay linear weights out as Paddle expects.

    Paddle's ``nn.Linear`` weight is (in_features, out_features), the transpose of torch's.
    With ``tie_word_embeddings`` PaddleNLP's head *is* the embedding parameter (used as
    (vocab, hidden) with ``transpose_y``), so ``lm_head.weight`` is redundant; it is stored
    anyway, as PaddleNLP's own ``save_pretrained`` does, because loading without it logs
    that ``lm_head.weight`` was "newly initialized" (untrue, but alarming).
    """
    linear = {
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
    }
    state: dict[str, np.ndarray] = {
        "llama.embed_tokens.weight": weights["tok_embeddings"],
        "llama.norm.weight": weights["norm"],
        "lm_head.weight": weights["tok_embeddings"].copy(),
    }
    for layer in range(cfg.n_layers):
        src = f"layers.{layer}"
        dst = f"llama.layers.{layer}"
        state[f"{dst}.input_layernorm.weight"] = weights[f"{src}.attention_norm"]
        state[f"{dst}.post_attention_layernorm.weight"] = weights[f"{src}.ffn_norm"]
        for kind, module in linear.items():
            w = weights[f"{src}.{kind}"]
            if kind == "wq":
                w = interleaved_to_half_split(w, cfg.n_heads)
            elif kind == "wk":
                w = interleaved_to_half_split(w, cfg.n_kv_heads)
            state[f"{dst}.{module}.weight"] = w.T
    return {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in state.items()}


def read_tokenizer(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """Read ``tokenizer.bin`` as (piece text, score) per id, control pieces unwrapped."""
    data = _read_bytes(path, "the llama2.c tokenizer")
    offset = 4  # int32 max_token_length: only a buffer size for llama2.c's C encoder
    vocab: list[tuple[str, float]] = []
    try:
        for token_id in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            raw = data[offset : offset + length]
            if length < 0 or len(raw) != length:
                raise ModelLoadError(
                    f"{str(path)!r}: token {token_id} claims {length} bytes past the end of "
                    "the file. The tokenizer file is truncated or not a llama2.c tokenizer."
                )
            offset += length
            vocab.append((raw.decode("utf-8"), score))
    except struct.error as err:
        raise ModelLoadError(
            f"{str(path)!r} ends after {len(vocab)} tokens; the model has vocab_size="
            f"{vocab_size}. Pass the tokenizer the model was trained with."
        ) from err
    except UnicodeDecodeError as err:
        raise ModelLoadError(
            f"{str(path)!r}: token {len(vocab)} is not valid UTF-8 ({err.reason}). Pass a "
            "llama2.c tokenizer exported from a sentencepiece model."
        ) from err
    if offset != len(data):
        raise ModelLoadError(
            f"{str(path)!r} has {len(data) - offset} bytes after token {vocab_size - 1}; the "
            f"model has vocab_size={vocab_size}. Pass the tokenizer the model was trained with."
        )

    # llama2.c's export writes the control pieces as "\n<s>\n" and "\n</s>\n".
    vocab[1] = (vocab[1][0].strip("\n"), vocab[1][1])
    vocab[2] = (vocab[2][0].strip("\n"), vocab[2][1])
    expected_head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size <= len(expected_head):
        raise ModelLoadError(
            f"{str(path)!r}: vocab_size={vocab_size} leaves no room for learned pieces after "
            f"the {len(expected_head)} special and byte pieces; this is not a BPE vocabulary "
            "with byte fallback."
        )
    actual_head = [piece for piece, _ in vocab[: len(expected_head)]]
    if actual_head != expected_head:
        bad = next(
            i for i, (a, e) in enumerate(zip(actual_head, expected_head, strict=True)) if a != e
        )
        raise ModelLoadError(
            f"{str(path)!r}: id {bad} is {actual_head[bad]!r}, expected {expected_head[bad]!r}. "
            "The converter needs sentencepiece's layout: <unk>, <s>, </s>, then the 256 "
            "byte-fallback pieces."
        )
    return vocab


def build_sentencepiece_model(vocab: list[tuple[str, float]]) -> bytes:
    """A serialized sentencepiece BPE model equivalent to llama2.c's tokenizer.

    BPE merges by piece score, with byte fallback and a dummy prefix space; no other
    normalisation (llama2.c's encoder neither collapses spaces nor applies NFKC).
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    piece_type = spm_pb2.ModelProto.SentencePiece.Type
    model = spm_pb2.ModelProto()
    for token_id, (text, score) in enumerate(vocab):
        entry = model.pieces.add()
        entry.piece = text.replace(_SPACE, _SPM_SPACE)
        entry.score = score
        if token_id == 0:
            entry.type = piece_type.UNKNOWN
        elif token_id in (1, 2):
            entry.type = piece_type.CONTROL
        elif token_id < 259:
            entry.type = piece_type.BYTE
        else:
            entry.type = piece_type.NORMAL

    trainer = model.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(vocab)
    trainer.byte_fallback = True
    # llama2.c trained this vocabulary with whitespace-only pieces allowed (id 410 is " ").
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1

    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    # ModelProto has no map fields, so serialization is already canonical; ask anyway.
    return model.SerializeToString(deterministic=True)


def llama_config(cfg: Llama2cConfig) -> dict[str, Any]:
    """PaddleNLP ``LlamaConfig`` fields, written explicitly (not via ``to_json_string``) so
    the file does not depend on the installed PaddleNLP version."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "seq_length": cfg.max_seq_len,
        "rms_norm_eps": 1e-5,  # llama2.c's RMSNorm eps (not stored in the export)
        "rope_theta": 10000.0,  # llama2.c's RoPE base (not stored in the export)
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD_TOKEN_ID,
        "dtype": "float32",
    }


def tokenizer_files(cfg: Llama2cConfig) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` contents."""
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": PAD_TOKEN,
    }
    return {
        TOKENIZER_CONFIG_FILE: {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": cfg.max_seq_len,
            **special,
        },
        SPECIAL_TOKENS_FILE: special,
    }


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _safetensors_bytes(state: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    # "np" is the format PaddleNLP's loader accepts; a single metadata key keeps the
    # header's key order fixed (safetensors orders the tensors themselves by name).
    return save(state, metadata={"format": "np"})


def convert_llama2c(model_bin: Path, tokenizer_bin: Path, out_dir: Path) -> None:
    """Write a PaddleNLP Llama checkpoint directory for a llama2.c Q8_0 model.

    Files in ``out_dir`` with the output names are replaced; other files are left alone.
    """
    model_bin, tokenizer_bin, out_dir = Path(model_bin), Path(tokenizer_bin), Path(out_dir)
    cfg, weights = read_q80_checkpoint(model_bin)
    vocab = read_tokenizer(tokenizer_bin, cfg.vocab_size)
    outputs: dict[str, bytes] = {
        CONFIG_FILE: _json_bytes(llama_config(cfg)),
        WEIGHTS_FILE: _safetensors_bytes(to_paddlenlp_state_dict(cfg, weights)),
    }
    spm_bytes = build_sentencepiece_model(vocab)
    outputs.update({name: spm_bytes for name in SPM_FILES})
    outputs.update({name: _json_bytes(obj) for name, obj in tokenizer_files(cfg).items()})

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file; pass a directory path.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out_dir / name).write_bytes(outputs[name])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with one line on a bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m ftlab.convert.llama2c",
        description="Convert a llama2.c Q8_0 (version 2) model and tokenizer to a "
        "PaddleNLP Llama checkpoint directory.",
    )
    parser.add_argument("--model", type=Path, required=True, help="llama2.c model .bin")
    parser.add_argument("--tokenizer", type=Path, required=True, help="llama2.c tokenizer .bin")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        convert_llama2c(args.model, args.tokenizer, args.out)
    except FtlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(OUTPUT_FILES)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
