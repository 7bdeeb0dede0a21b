"""Find the files of each split from ``data.path`` / ``data.train_path`` / ``data.dev_path``.

Layout: a directory holding ``train.json`` (or ``.jsonl``) or a ``train/`` directory of
``*.json`` / ``*.jsonl`` files, and the same for ``dev``; or a single file as the train split.
Ambiguity (``train.json`` next to ``train/``) is an error rather than a silent choice.
"""

from __future__ import annotations

from pathlib import Path

from ftlab.config.schema import DataConfig
from ftlab.errors import DataError

SUFFIXES = (".json", ".jsonl")


def _files_of(path: Path, setting: str) -> list[Path]:
    """The JSON-lines files a setting points at: the file itself, or a directory's files."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise DataError(
                f"{setting}: directory {path} holds no *.json or *.jsonl files. "
                "Put the split's JSON-lines files there or point the setting elsewhere."
            )
        return files
    raise DataError(
        f"{setting}: looked for {path.resolve()}"
        + ("" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})")
        + ", which does not exist. Set it to an existing JSON-lines file or directory."
    )


def _split_in_dir(root: Path, split: str) -> list[Path] | None:
    """``split.json`` / ``split.jsonl`` / ``split/`` inside ``root``; None when absent."""
    candidates = [root / f"{split}{s}" for s in SUFFIXES] + [root / split]
    found = [p for p in candidates if p.exists()]
    if len(found) > 1:
        raise DataError(
            f"data.path: {root} holds more than one {split} split: "
            f"{', '.join(p.name for p in found)}. Keep one of them (or set "
            f"data.{split}_path to choose)."
        )
    return _files_of(found[0], "data.path") if found else None


def resolve_split_files(cfg: DataConfig, split: str) -> list[Path] | None:
    """Files of ``split`` ("train" or "dev"), or None when the layout has no such split."""
    explicit = cfg.train_path if split == "train" else cfg.dev_path
    if explicit:
        return _files_of(Path(explicit).expanduser(), f"data.{split}_path={explicit}")
    if not cfg.path:
        if split == "train":
            raise DataError("data.path is empty: set it to a data directory or a JSON-lines file.")
        return None
    root = Path(cfg.path).expanduser()
    if not root.exists():
        where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(
            f"data.path={cfg.path} (data={cfg.name}): looked for {root.resolve()}{where}, "
            "which does not exist. Set data.path to a directory holding train.json and "
            "dev.json (or train/ and dev/ directories of *.json / *.jsonl files), or to a "
            "JSON-lines file."
        )
    if root.is_file():
        return [root] if split == "train" else None
    files = _split_in_dir(root, split)
    if files is None and split == "train":
        looked = ", ".join(f"{root.resolve() / 'train'}{s}" for s in (*SUFFIXES, "/"))
        raise DataError(
            f"data.path={cfg.path} (data={cfg.name}): no train split; looked for {looked}. "
            "Put the training records there (JSON lines), or set data.train_path to the file."
        )
    return files
