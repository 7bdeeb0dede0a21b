"""Read JSON-lines files into records that remember where they came from.

Every problem names ``file:line`` (and the byte offset for encoding errors) because the
user has to find the record to fix it. ``data.on_bad_record`` decides between stopping and
skipping; skips are counted by reason, never dropped quietly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.data.stats import SplitStats
from ftlab.errors import DataError

BOM = b"\xef\xbb\xbf"
SKIP_HINT = "Fix the record, or set data.on_bad_record=skip to skip and count such records."


@dataclass(frozen=True)
class Record:
    """One JSON object from a data file and its location (``path:line``)."""

    data: dict[str, Any]
    where: str


class BadRecords:
    """Applies ``data.on_bad_record``: raise with the location, or count the skip."""

    def __init__(self, policy: str, stats: SplitStats, hint: str = SKIP_HINT) -> None:
        self.policy = policy
        self.stats = stats
        self.hint = hint  # what to do, after the message (a reader without a skip policy)

    def reject(self, reason: str, message: str) -> None:
        if self.policy == "error":
            raise DataError(f"{message}. {self.hint}".strip())
        self.stats.count_skip(reason, message)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: an object with a repeated key is an error, at any depth."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _parse_line(raw: bytes, where: str, offset: int, bad: BadRecords) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.reject(
            "not_utf8",
            f"{where}: not valid UTF-8 (byte offset {offset + err.start} in the file, bytes "
            f"{raw[err.start : err.start + 4]!r}); re-save the file as UTF-8",
        )
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as dup:
        bad.reject(
            "duplicate_key",
            f"{where}: key {dup.key!r} appears more than once in one object (JSON keeps only "
            "the last value, silently); remove the duplicate",
        )
        return None
    except RecursionError:  # json's decoder recurses once per nesting level
        bad.reject(
            "invalid_json",
            f"{where}: nested too deeply to read (thousands of levels of arrays or objects); "
            "a training record is a flat object of strings",
        )
        return None
    except json.JSONDecodeError as err:
        hint = ""
        if text.lstrip().startswith("["):
            hint = " (the file looks like a JSON array; ftlab reads JSON lines: one object a line)"
        bad.reject(
            "invalid_json", f"{where}: not valid JSON: {err.msg} at column {err.colno}{hint}"
        )
        return None
    if not isinstance(obj, dict):
        bad.reject(
            "not_an_object",
            f"{where}: expected a JSON object per line, found a {type(obj).__name__}",
        )
        return None
    return obj


def iter_records(
    path: Path, bad: BadRecords, stats: SplitStats, digest: Any | None = None
) -> Iterator[Record]:
    """Yield the records of one JSON-lines file; feed its bytes to ``digest`` when given."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if digest is not None:
                digest.update(raw)
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM) :], start + len(BOM)
            if not raw.strip():
                stats.blank_lines += 1
                continue
            stats.records_read += 1
            obj = _parse_line(raw, f"{path}:{lineno}", start, bad)
            if obj is not None:
                yield Record(obj, f"{path}:{lineno}")


def read_split(
    files: list[Path], bad: BadRecords, stats: SplitStats, fingerprints: dict[str, str]
) -> list[Record]:
    """All records of a split, hashing each file as it is read (one pass)."""
    records: list[Record] = []
    for path in files:
        digest = hashlib.sha256()
        records.extend(iter_records(path, bad, stats, digest))
        fingerprints[str(path.resolve())] = digest.hexdigest()
        stats.files += 1
    return records
