"""The one rule for reading weights: safetensors only, pickles only when allowed.

A pickle (``*.pdparams``, ``pytorch_model.bin``, ``*.pth``...) runs code when it is read:
``paddle.load`` and ``torch.load`` unpickle. PaddleNLP reads one whenever a directory holds
no safetensors of the name it looks for first (``from_pretrained`` falls back to
``model_state.pdparams``; ``LoRAModel.from_pretrained`` reads ``lora_model_state.pdparams``
when ``peft_model.safetensors.index.json`` is missing), so a file planted in a run or model
directory would run with the user's rights. ftlab writes safetensors everywhere; before
any directory is handed to a loader, ``refuse_pickles`` stops on a pickled weights file
unless ``model.allow_pickle=true`` was given. Every load of a base model, a run's
``final/``, an ``init_from`` source and a resume checkpoint goes through it; the Hugging
Face conversion is meant to share it.

``read_safetensors`` reads one file to NumPy with a one-line error for a damaged file
(the safetensors library raises its own exception type, with the file unnamed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import ModelLoadError
from ftlab.models.hub_cache import local_model_dir
from ftlab.record.provenance import sha256_file

# Files a loader may unpickle as weights or training state. ``training_args.bin`` (a
# pickle PaddleNLP's Trainer writes beside every save) is never read by ftlab or by
# PaddleNLP's loaders, so its presence is not refused.
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pdmodel.pkl", ".pth", ".pt", ".pkl", ".pickle", ".ckpt")
PICKLE_BIN_NAMES = ("pytorch_model", "model_state", "adapter_model")
NEVER_READ = ("training_args.bin",)
ALLOW = "model.allow_pickle=true"


def pickled_weights(directory: Path | str) -> list[Path]:
    """The pickled weight (or state) files directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for f in sorted(directory.iterdir()):
        name = f.name
        if name in NEVER_READ or not f.is_file():
            continue
        if name.endswith(PICKLE_SUFFIXES) or (
            name.endswith(".bin") and name.startswith(PICKLE_BIN_NAMES)
        ):
            out.append(f)
    return out


def refuse_pickles(directory: Path | str, allow_pickle: bool, what: str = "weights") -> None:
    """Raise ``ModelLoadError`` naming the first pickle in ``directory`` (unless allowed).

    Any pickled weights file is refused, even beside safetensors: which one a loader
    picks depends on names and versions, and a planted file must never get the chance.
    """
    if allow_pickle:
        return
    found = pickled_weights(directory)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise pickle_refused(f"{found[0]}{more}", what)


def pickle_refused(where: Path | str, what: str = "weights") -> ModelLoadError:
    """The one refusal of a pickled file (ftlab's own checkpoints and input directories)."""
    return ModelLoadError(
        f"{where}: a pickle, which runs code when read; ftlab reads {what} from "
        f"safetensors only. Remove or convert it, or, only if you trust its origin, set "
        f"{ALLOW} (ftlab-predict/ftlab-merge: --allow-pickle)."
    )


def read_safetensors(path: Path | str) -> dict[str, Any]:
    """Every tensor of a safetensors file as NumPy; a damaged file is one clear error."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (expected safetensors weights).")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends, named below
        raise ModelLoadError(damaged_message(path, err)) from err


def damaged_message(path: Path | str, err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return (
        f"{path} is damaged or not a safetensors file ({type(err).__name__}: {first}). "
        "Restore it from a copy, or retrain."
    )


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone (None: whole).

    The format is an 8-byte header length, a JSON header giving every tensor's byte range,
    then the data; a file shorter (or longer) than its header says is damaged. Nothing is
    deserialised beyond the JSON header.
    """
    import json

    size = path.stat().st_size
    if size < 8:
        return f"truncated: {size} bytes, not even a header"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if 8 + length > size:
            return f"truncated: its header alone needs {8 + length} bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not a valid safetensors header"
    if 8 + length + end != size:
        return f"truncated: its header describes {8 + length + end} bytes, the file has {size}"
    return None


def check_safetensors_dir(directory: Path | str) -> None:
    """Check every safetensors file of ``directory`` (``safetensors_problem``) before a
    loader reads it: a truncated or overwritten file is one error naming it."""
    import json

    directory = Path(directory)
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index} is not a readable weights index ({err}).") from err
        missing = sorted(n for n in names if not (directory / n).is_file())
        if missing:
            raise ModelLoadError(
                f"{directory / missing[0]} is missing (named in {index.name}): the weights are "
                "incomplete. Restore the file, or retrain."
            )
    for f in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise ModelLoadError(f"{f} is damaged ({problem}). Restore it from a copy, or retrain.")


def weight_hashes(name_or_path: str | Path) -> dict[str, str]:
    """sha256 of every weights file of a local model directory, by file name ({} for a hub
    name): recorded at training, so a base whose weights changed since is noticed."""

    path = local_model_dir(str(name_or_path))  # a cached hub snapshot counts as local
    if path is None:
        return {}
    files = [*sorted(path.glob("*.safetensors")), *pickled_weights(path)]
    return {f.name: sha256_file(f) for f in files}


def changed_weights(name_or_path: str | Path, recorded: dict[str, str]) -> list[str]:
    """What differs between ``recorded`` hashes and the directory now, one phrase each."""
    if not recorded or local_model_dir(str(name_or_path)) is None:
        return []
    now = weight_hashes(name_or_path)
    out = []
    for name in sorted(set(recorded) | set(now)):
        before, after = recorded.get(name), now.get(name)
        if before != after:
            out.append(
                f"{name}: "
                + (
                    "missing now"
                    if after is None
                    else "new"
                    if before is None
                    else f"sha256 {before[:12]} at training, {after[:12]} now"
                )
            )
    return out
