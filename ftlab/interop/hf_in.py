"""Hugging Face checkpoints in: convert once into a content-addressed cache, reuse after.

``model.name_or_path=DIR`` with a Hugging Face checkpoint (``ftlab.interop.hf_layout``
decides from the files) is converted to PaddleNLP's layout with the PaddleNLP model
class's own name mappings (``<Class>._get_name_mappings``: the renames and the
``[out, in]`` -> ``[in, out]`` transposes ``from_pretrained(..., convert_from_torch=True)``
applies). Why not call that: it writes a pickled ``model_state.pdparams`` into the user's
directory. Here the tensors are read with a header parse + ``numpy.memmap`` (the source
dtype is kept; bfloat16 stays bfloat16), checked against ``config.json`` (every tensor
known, none missing, every shape the one the config implies) and written as safetensors
into ``$FTLAB_CACHE/hf/<key>`` (default ``~/.cache/ftlab``), where ``<key>`` hashes the
source files' contents and the converter version. The entry is built in a temporary
directory and renamed into place, so an entry that exists is complete: a conversion that
was killed leaves only a ``.tmp-*`` directory, never used. The user's directory is only
read. The conversion record (source hashes, class, mapping counts, tokenizer choice) is in
the entry and goes into the run's ``model_source.json``.

A hub name whose snapshot is in the local Hugging Face cache (``ftlab.models.hub_cache``)
is converted from the snapshot like a local directory (no network); its record names the
repository, revision, commit and snapshot path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.config.schema import ModelConfig
from ftlab.errors import ModelLoadError
from ftlab.interop.hf_layout import (
    CONFIG_FILE,
    DTYPE_BYTES,
    HFCheckpoint,
    TensorInfo,
    detect,
    pickled_weights_allowed,
    torch_pickles,
)
from ftlab.interop.hf_tokenizer import stage_for_paddlenlp, tokenizer_files
from ftlab.models.arch import model_tensors, optional_tensors
from ftlab.models.compat import apply_fixes
from ftlab.models.config_json import family_of, looks_local, read_config_json, resolve_model
from ftlab.models.families import family
from ftlab.models.hub_cache import find_snapshot, local_model_dir
from ftlab.record.provenance import sha256_file

CONVERTER_VERSION = 4  # 2: every tensor shape-checked, ChatGLM2; 3: hf_config_*, tied_head_copy;
# 4: hf_tokenizer_config (Qwen's eos, ChatGLM2's tokenizer class)
RECORD_FILE = "ftlab_hf_conversion.json"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that the PaddleNLP model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8"}
NUMPY_DTYPES |= {"I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}
# safetensors header dtype -> the name ``safetensors.TensorSpec`` takes
SPEC_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SPEC_DTYPES |= {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}
SPEC_DTYPES |= {"BOOL": "bool"}
# numpy dtype -> safetensors dtype (PaddleNLP's load_torch gives bfloat16 as uint16 bits)
_SAFETENSORS_OF = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "<u2": "BF16", "<i8": "I64"}
_SAFETENSORS_OF |= {"<i4": "I32", "<i2": "I16", "|i1": "I8", "|u1": "U8", "|b1": "BOOL"}

_converted: dict[str, dict[str, Any]] = {}  # this process: source dir -> conversion record


def cache_root() -> Path:
    """``$FTLAB_CACHE``, else ``$XDG_CACHE_HOME/ftlab``, else ``~/.cache/ftlab``."""
    if os.environ.get("FTLAB_CACHE"):
        return Path(os.environ["FTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ftlab"


def conversion_records() -> list[dict[str, Any]]:
    """The Hugging Face conversions this process used (for the run's provenance)."""
    return list(_converted.values())


def paddle_dir(name_or_path: str, allow_pickle: bool) -> str:
    """Where PaddleNLP should load ``name_or_path`` from: the converted cache entry for a
    Hugging Face checkpoint, else ``name_or_path`` itself."""

    directory = Path(name_or_path).expanduser()
    snapshot = None if looks_local(name_or_path) else find_snapshot(name_or_path)
    if snapshot is not None:
        directory = snapshot.path
        name_or_path = str(directory)  # PaddleNLP reads the snapshot, never the network
    if not (directory / CONFIG_FILE).is_file():
        return name_or_path
    key = str(directory.resolve())
    if key in _converted:
        return _converted[key]["cache_entry"]
    fam = _family(directory)
    pickles = torch_pickles(directory)
    staged = None
    if pickles:
        pickled_weights_allowed(pickles[0], allow_pickle)
        staged = stage_pickles(directory, pickles)
    ckpt = detect(Path(staged["dir"]) if staged else directory, fam.base_prefix, allow_pickle)
    if ckpt is None:
        model_type = read_config_json(directory).get("model_type")
        if fam.paddle_config is not None and model_type != fam.name:
            raise ModelLoadError(
                f"{directory / CONFIG_FILE}: a Hugging Face {fam.name} config.json "
                f"(model_type {model_type!r}) beside weights that are not in Hugging Face's "
                f"layout: PaddleNLP 3.0.0b4 would build another class than {fam.causal_lm_class} "
                "from it. Use the Hugging Face checkpoint as it was downloaded (ftlab "
                "converts it), or PaddleNLP's converted checkpoint with its own config.json."
            )
        return name_or_path
    record = convert_cached(ckpt)
    if staged:
        record = {**record, "pickled_source": staged}
    if snapshot is not None:
        record = {**record, "hub": snapshot.record()}
    _converted[key] = record
    return record["cache_entry"]


def stage_pickles(directory: Path, pickles: list[Path]) -> dict[str, Any]:
    """``pytorch_model*.bin`` (only with ``model.allow_pickle=true``) -> safetensors in
    ``$FTLAB_CACHE/staged/<key>`` (config and tokenizer copied alongside), written
    atomically; the Hugging Face conversion then reads that directory. Read with PaddleNLP's
    ``load_torch`` (no torch needed), which unpickles: hence the switch."""
    from paddlenlp.utils.serialization import load_torch

    hashes = file_hashes([directory / CONFIG_FILE, *pickles])
    key = cache_key(hashes)
    root = cache_root() / "staged"
    entry = root / key
    record = {"dir": str(entry), "pickles": {p.name: hashes[p.name] for p in pickles}}
    if (entry / CONFIG_FILE).is_file():
        return record
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = {}
        for i, path in enumerate(pickles, start=1):
            try:
                state = load_torch(str(path))
            except Exception as err:  # noqa: BLE001 - one line naming the file
                raise ModelLoadError(
                    f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}). Copy it again or "
                    "convert it to safetensors."
                ) from None
            name = f"model-{i:05d}-of-{len(pickles):05d}.safetensors"
            tensors = {
                k: (_SAFETENSORS_OF[np.dtype(v.dtype).str], np.ascontiguousarray(v))
                for k, v in state.items()
            }
            write_safetensors(tmp / name, tensors, fmt="pt")
            names.update(dict.fromkeys(state, name))
        index = {"metadata": {}, "weight_map": names}
        (tmp / INDEX_FILE).write_text(json.dumps(index) + "\n")
        for src in [directory / CONFIG_FILE, *tokenizer_files(directory)]:
            shutil.copyfile(src, tmp / src.name)  # config last would not matter: rename below
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _family(directory: Path) -> Any:

    return family_of(read_config_json(directory), directory)


# --------------------------------------------------------------------------- hashing


def source_files(ckpt: HFCheckpoint) -> list[Path]:
    """Everything the converted entry is made from: config, weights, index, tokenizer."""
    index = ckpt.directory / INDEX_FILE
    extra = [index] if index.is_file() else []
    return [ckpt.directory / CONFIG_FILE, *ckpt.files, *extra, *tokenizer_files(ckpt.directory)]


def file_hashes(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """sha256 of each file, remembered by (path, size, mtime) so later runs do not re-read
    gigabytes; a file changed in place gets a new size or mtime and is hashed again."""

    memo_path = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    out, changed = {}, False
    for path in paths:
        st = path.stat()
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(stamp)
        if digest is None:
            digest, changed = sha256_file(path), True
            memo[stamp] = digest
        out[path.name] = {"sha256": digest, "bytes": st.st_size}
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".hashes-{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    return out


def cache_key(hashes: Mapping[str, Mapping[str, Any]]) -> str:
    body = {"converter": CONVERTER_VERSION, "files": {k: v["sha256"] for k, v in hashes.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- conversion


def convert_cached(ckpt: HFCheckpoint) -> dict[str, Any]:
    """The cache entry for ``ckpt`` (converted now if absent); returns its record."""
    hashes = file_hashes(source_files(ckpt))
    key = cache_key(hashes)
    root = cache_root() / "hf"
    entry = root / key
    if (entry / RECORD_FILE).is_file():
        record = json.loads((entry / RECORD_FILE).read_text())
        return {**record, "reused": True, "cache_entry": str(entry)}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        record = convert(ckpt, tmp)
        record.update(source=str(ckpt.directory.resolve()), source_files=hashes, key=key)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if entry.exists() and not (entry / RECORD_FILE).is_file():
            shutil.rmtree(entry)  # not made by this code's rename: never trusted
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / RECORD_FILE).is_file():  # not another process's finished entry
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**record, "reused": False, "cache_entry": str(entry)}


def name_mappings(config_dir: Path, fam: Any) -> tuple[Any, list[Any]]:
    """PaddleNLP's config (from ``config_dir``) and its model class's name mappings."""
    import paddlenlp.transformers as pt
    from paddlenlp.transformers import AutoConfig

    apply_fixes()
    cls = getattr(pt, fam.causal_lm_class)
    config = AutoConfig.from_pretrained(str(config_dir))
    if not getattr(config, "architectures", None):
        config.architectures = [fam.causal_lm_class]
    return cls, cls._get_name_mappings(config)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's values, memory-mapped (bfloat16 as its raw uint16 bits)."""
    count = (info.end - info.begin) // DTYPE_BYTES[info.dtype]
    arr = np.memmap(
        info.file, dtype=NUMPY_DTYPES[info.dtype], mode="r", offset=info.begin, shape=(count,)
    )
    return np.asarray(arr).reshape(info.shape)


def convert(ckpt: HFCheckpoint, out: Path) -> dict[str, Any]:
    """Write ``ckpt`` in PaddleNLP's layout into ``out``; returns the conversion record."""

    fam = _family(ckpt.directory)
    model = resolve_model(ModelConfig(name_or_path=str(ckpt.directory)))
    # what transformers' class computes with where PaddleNLP's config would differ (the row)
    config = {
        **fam.hf_config_defaults,
        **json.loads((ckpt.directory / CONFIG_FILE).read_text(encoding="utf-8")),
        **fam.hf_config_fixed,
    }
    if fam.paddle_config is not None:  # what PaddleNLP's class needs (ChatGLM2's keys)
        config |= fam.paddle_config(config)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    cls, mappings = name_mappings(out, fam)
    by_source: dict[str, list[Any]] = {}
    for m in mappings:
        by_source.setdefault(fam.hf_name_prefix + m.source_name, []).append(m)
    tied = bool(model.arch.tie_word_embeddings)
    dropped = _unknown_or_dropped(ckpt, by_source, tied)
    targets = {m.target_name for m in mappings}
    shapes = model_tensors(model)
    known = shapes | optional_tensors(model)
    _missing(ckpt, by_source, expected_shapes(shapes, model, targets))
    expected = expected_shapes(known, model, targets)
    # a target PaddleNLP's mappings leave without the base prefix (ChatGLM2) is written
    # under the name its model holds it by
    written = {t: t if t in known else f"{fam.base_prefix}.{t}" for t in expected}
    weight_map: dict[str, str] = {}
    counts = {"renamed": 0, "transposed": 0, "kept": 0}
    total = 0
    for i, file in enumerate(ckpt.files, start=1):
        tensors: dict[str, tuple[str, np.ndarray]] = {}
        for info in ckpt.tensors_in(file):
            if info.name in dropped:
                continue
            for m in by_source[info.name]:
                value = m.run({info.name: read_tensor(info)}, info.name)
                _check_shape(info, m.target_name, value.shape, expected, m.should_transpose())
                counts["transposed" if m.should_transpose() else "kept"] += 1
                counts["renamed"] += m.target_name != info.name
                tensors[written[m.target_name]] = (info.dtype, np.ascontiguousarray(value))
                total += value.nbytes
        if tied and fam.tied_head_copy and fam.tied_head_copy[0] in tensors:
            embedding, head = fam.tied_head_copy  # PaddleNLP's class never ties (the row)
            tensors[head] = tensors[embedding]
            counts["tied_head_copied"] = 1
        name = f"model-{i:05d}-of-{len(ckpt.files):05d}.safetensors"
        write_safetensors(out / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    tokenizer = stage_for_paddlenlp(ckpt.directory, out, fam.hf_tokenizer_config)
    from paddlenlp import __version__ as paddlenlp_version

    return {
        "converter": f"ftlab.interop.hf_in v{CONVERTER_VERSION}",
        "family": fam.name,
        "paddlenlp": paddlenlp_version,
        "name_mappings": f"paddlenlp.transformers.{cls.__name__}._get_name_mappings",
        "tensors": counts,
        "dropped": sorted(dropped),
        "dtypes": sorted({t.dtype for t in ckpt.tensors.values()}),
        "tied_head": tied,
        "tokenizer": tokenizer,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_safetensors(
    path: Path, tensors: Mapping[str, tuple[str, np.ndarray]], fmt: str = "np"
) -> None:
    """Write ``{name: (safetensors dtype, contiguous array)}``. Through ``TensorSpec``
    (raw buffer + dtype name) so bfloat16 bits (uint16 arrays) need no numpy bfloat16.
    ``fmt``: the metadata format: "np" for PaddleNLP (which refuses "pt"), "pt" for
    transformers."""
    from safetensors import TensorSpec, serialize_file

    specs = {
        name: TensorSpec(
            dtype=SPEC_DTYPES[dtype],
            shape=tuple(arr.shape),
            data_ptr=arr.ctypes.data,
            data_len=arr.nbytes,
        )
        for name, (dtype, arr) in tensors.items()
    }
    serialize_file(specs, str(path), metadata={"format": fmt})


def _unknown_or_dropped(ckpt: HFCheckpoint, by_source: Mapping[str, Any], tied: bool) -> set[str]:
    dropped = set()
    for info in ckpt.tensors.values():
        if info.name in by_source:
            continue
        if info.name.endswith(IGNORED_SUFFIXES) or (tied and info.name == "lm_head.weight"):
            dropped.add(info.name)  # recomputed by the model / the tied head is the embedding
            continue
        raise ModelLoadError(
            f"{info.file}: tensor {info.name!r} is not a weight of PaddleNLP's "
            f"{_family(ckpt.directory).causal_lm_class} as config.json describes it. The "
            "checkpoint is a different architecture (or a variant PaddleNLP does not "
            "implement): check config.json's model_type and architecture keys."
        )
    return dropped


def _missing(
    ckpt: HFCheckpoint,
    by_source: Mapping[str, list[Any]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    """Every weight config.json implies (``expected_shapes``) must come from some tensor.
    (Not "every mapping source": PaddleNLP's mappings list variants
    a config does not use, e.g. DeepSeek's q_proj and q_a_proj both.)"""
    made = {m.target_name: name for name, ms in by_source.items() for m in ms}
    present = {m.target_name for name in ckpt.tensors for m in by_source.get(name, ())}
    for target in expected:
        if target not in present:
            source = made.get(target, target)
            raise ModelLoadError(
                f"{ckpt.directory}: config.json implies tensor {source!r}, which none of "
                f"the weight files ({', '.join(f.name for f in ckpt.files)}) holds. A shard "
                "is missing or config.json belongs to another model."
            )


def expected_shapes(
    shapes: Mapping[str, tuple[int, ...]], model: Any, targets: set[str]
) -> dict[str, tuple[int, ...]]:
    """For each tensor name PaddleNLP's mappings produce (``targets``), the shape
    config.json implies (``shapes``: ``ftlab.models.arch.model_tensors``, i.e. embeddings,
    norms, linears, biases, routers, head, rotary table); a target with no such shape is
    left out, and refused by ``_check_shape`` when the checkpoint holds it. ChatGLMv2's
    mappings name tensors without the ``chatglm_v2.`` prefix its model adds on load."""
    prefix = family(model.family).base_prefix
    out = {}
    for target in targets:
        want = shapes.get(target, shapes.get(f"{prefix}.{target}"))
        if want is not None:
            out[target] = want
    return out


def _check_shape(
    info: TensorInfo,
    target: str,
    shape: tuple[int, ...],
    expected: Mapping[str, tuple[int, ...]],
    transposed: bool,
) -> None:
    want = expected.get(target)
    if want is None:
        raise ModelLoadError(
            f"{info.file}: tensor {info.name!r} (PaddleNLP's {target!r}) is not a weight "
            "config.json implies for this model (shape "
            f"{list(info.shape)}). The weights and config.json are from different models, "
            "or the checkpoint is a variant PaddleNLP does not build: use the config.json "
            "that came with these weights."
        )
    if tuple(shape) == tuple(want):
        return
    hf_want = list(reversed(want)) if transposed else list(want)
    raise ModelLoadError(
        f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, but config.json "
        f"implies {hf_want}. The weights and config.json are from different models: use "
        "the config.json that came with these weights."
    )


def base_config_json(name_or_path: str | None) -> dict[str, Any] | None:
    """The base model's own config.json (local dir or cached hub snapshot), or None."""
    directory = local_model_dir(name_or_path) if name_or_path else None
    path = directory / CONFIG_FILE if directory else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
