"""Recognise a Hugging Face checkpoint directory from its files, and refuse broken ones.

A directory is in Hugging Face's layout when its safetensors say so: the metadata
``{"format": "pt"}`` that transformers writes, or tensor names outside PaddleNLP's
(``model.layers.0...`` where PaddleNLP writes ``llama.layers.0...``). The weight files are
``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (or named
``model-0000N-of-0000M.safetensors``). Only the headers are read here (a few KB per
file): the tensors themselves are read by ``ftlab.interop.hf_in`` when converting.

Every refusal is one line naming the file (and tensor) and what to do, raised before any
weights are loaded. No Paddle import.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.errors import ModelLoadError
from ftlab.models.weights import pickle_refused

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
# Pickled weight files: unpickling runs code named in the file (see pickled_weights_allowed).
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pdparams", "*.pt", "*.pth", "*.ckpt")
# safetensors dtype -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
DTYPE_BYTES |= {"U8": 1, "BOOL": 1}
MAX_HEADER = 100 << 20  # the safetensors format's own header limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (offsets into the file's data)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face checkpoint directory whose weight files are all present and whole."""

    directory: Path
    files: tuple[Path, ...]  # safetensors files, in shard order
    tensors: Mapping[str, TensorInfo]
    config: Mapping[str, Any]

    def tensors_in(self, file: Path) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.file == file]


def read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """A safetensors file's metadata and tensors; a truncated or corrupt file is refused.

    Written by hand (the ``safetensors`` package reads only complete files and its error on
    a truncated one names neither the file nor the tensor): the format is an 8-byte length,
    a JSON header, then the tensors' bytes at the header's offsets.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _broken(path, f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise _broken(path, f"header of {length} bytes does not fit in {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _broken(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _broken(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    tensors = {}
    for name, spec in header.items():
        try:
            dtype, shape = spec["dtype"], tuple(int(x) for x in spec["shape"])
            begin, end = (base + int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _broken(path, f"tensor {name!r} has no valid dtype/shape/offsets") from None
        count = 1
        for dim in shape:
            count *= dim
        if dtype not in DTYPE_BYTES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has dtype {dtype}, which ftlab does not convert "
                "(float32/16, bfloat16 and integer tensors are supported). Re-save the "
                "checkpoint in one of those dtypes."
            )
        if end - begin != count * DTYPE_BYTES[dtype] or end > size:
            raise _broken(
                path,
                f"tensor {name!r} needs bytes up to {end}, the file has {size}"
                if end > size
                else f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}",
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, begin, end)
    return dict(metadata), tensors


def _broken(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a complete safetensors file ({what}); it is truncated or corrupt. "
        "Copy or download it again."
    )


def weight_files(directory: Path) -> list[Path] | None:
    """The safetensors files of a directory, complete; None when it has none.

    A missing shard (by the index, or by the ``-of-0000M`` names) is refused naming it.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(
                f"{index}: not a valid safetensors index (a JSON object with a weight_map). "
                "Copy it again from the checkpoint's source."
            ) from None
        for name in names:
            if not (directory / name).is_file():
                tensor = next(t for t, f in weight_map.items() if f == name)
                raise ModelLoadError(
                    f"{index} names {name} (for tensor {tensor!r} and others), which is not "
                    f"in {directory}. Copy the missing shard into the directory."
                )
        return [directory / name for name in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    shards = sorted(
        p for p in directory.glob("model-*-of-*.safetensors") if SHARD_NAME.match(p.name)
    )
    if not shards:
        return None
    total = int(SHARD_NAME.match(shards[0].name).group(2))  # type: ignore[union-attr]
    width = len(SHARD_NAME.match(shards[0].name).group(1))  # type: ignore[union-attr]
    for n in range(1, total + 1):
        name = f"model-{n:0{width}d}-of-{total:0{width}d}.safetensors"
        if not (directory / name).is_file():
            raise ModelLoadError(
                f"{directory}: shard {name} is missing (and there is no {INDEX_FILE}). Copy "
                "the missing shard (and the index) into the directory."
            )
    return shards


def torch_pickles(directory: Path) -> list[Path] | None:
    """``pytorch_model.bin`` or its shards, when the directory has no safetensors."""
    if weight_files(directory) is not None:
        return None
    bins = sorted(directory.glob("pytorch_model*.bin"))
    return bins or None


def pickled_files(directory: Path) -> list[Path]:
    return sorted({p for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})


def pickled_weights_allowed(path: Path, allow_pickle: bool) -> None:
    """Refuse a pickled weight file unless ``model.allow_pickle=true``.

    Unpickling executes whatever callable the file names, so a downloaded ``.bin`` or
    ``.pdparams`` can run arbitrary code; safetensors holds only numbers. Kept as one small
    function so the checks for ftlab's own checkpoints and for input directories agree.
    """
    if not allow_pickle:  # transformers converts: save_pretrained(..., safe_serialization=True)
        raise pickle_refused(path, "weights")


def is_hf_names(names: list[str], metadata: Mapping[str, str], paddle_prefix: str) -> bool:
    """Hugging Face layout by the files: transformers' ``pt`` metadata, or names outside
    PaddleNLP's (``<base_model_prefix>.``, ``lm_head.``)."""
    if metadata.get("format") == "pt":
        return True
    return any(not n.startswith((f"{paddle_prefix}.", "lm_head.")) for n in names)


def detect(directory: Path, paddle_prefix: str, allow_pickle: bool) -> HFCheckpoint | None:
    """The Hugging Face checkpoint in ``directory``, or None when it is not one (PaddleNLP's
    own layout, or no weights at all: PaddleNLP then reports what is missing)."""
    files = weight_files(directory)
    if files is None:
        pickles = pickled_files(directory)
        if pickles:  # only reached with allow_pickle=true via hf_in's staging
            pickled_weights_allowed(pickles[0], allow_pickle)
            raise ModelLoadError(
                f"{pickles[0]}: model.allow_pickle=true is set, but ftlab converts pickled "
                "Hugging Face weights only as pytorch_model*.bin. Convert the weights to "
                "safetensors (transformers: save_pretrained(..., safe_serialization=True))."
            )
        return None
    tensors: dict[str, TensorInfo] = {}
    hf = False
    for path in files:
        metadata, found = read_header(path)
        for name in found:
            if name in tensors:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} is also in {tensors[name].file.name}. Remove "
                    "the stray file or copy the checkpoint again."
                )
        tensors.update(found)
        hf = hf or is_hf_names(list(found), metadata, paddle_prefix)
    if not hf:
        return None
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    return HFCheckpoint(directory, tuple(files), tensors, config)
