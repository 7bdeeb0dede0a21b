"""``RunDir``: the experiment directory of one run, its file names and every write into it.

Every module that reads or writes a run's files goes through this class, so the layout
lives here once (the README's tree). Writes are atomic (a reader never sees half a file)
and happen on the main process only: a ``RunDir`` made with ``is_main=False`` (the other
ranks of a multi-process run) ignores every write, so the orchestration needs no rank
checks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

HYDRA = ".hydra"
RESOLVED_CONFIG = "resolved_config.yaml"
ENVIRONMENT = "environment.json"
FINGERPRINTS = "data_fingerprints.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SAMPLES = "samples.jsonl"
STATUS = "status.json"
ERROR = "error.txt"
PLAN = "plan.json"
AUTO_LAYOUT = "auto_layout.json"  # parallel=auto: every candidate layout and the choice
EXPORT = "run_finetune.json"
EXPORT_NOTES = "run_finetune_notes.json"
VISUALDL = "visualdl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
LOGS = "logs"
MERGED = "merged"
# Inside final/: which method and base model the saved artefact belongs to.
METHOD_RECORD = "ftlab_method.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """One run's directory (see the README's "experiment directory")."""

    def __init__(self, path: Path | str, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ places

    @property
    def hydra(self) -> Path:
        return self.path / HYDRA

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def visualdl(self) -> Path:
        return self.path / VISUALDL

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def merged(self) -> Path:
        return self.path / MERGED

    # ------------------------------------------------------------------ writes

    def create(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            write_json_atomic(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            write_text_atomic(self.path / name, text)

    def append_jsonl(self, name: str, obj: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.path / name, "a") as f:
                f.write(json.dumps(obj, sort_keys=True) + "\n")

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.is_main:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_text_atomic(self.path / name, text)

    def truncate_metrics(self, step: int) -> int:
        """Drop metric lines after ``step`` (a resumed run logs those steps again)."""
        if not self.is_main:
            return 0
        lines = self.read_jsonl(METRICS)
        kept = [x for x in lines if x.get("step", 0) <= step]
        write_text_atomic(self.metrics, "".join(json.dumps(x, sort_keys=True) + "\n" for x in kept))
        return len(lines) - len(kept)

    def save_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer beside the trained artefact in ``final/`` (pad token included)."""
        if self.is_main:
            tokenizer.save_pretrained(str(self.final))

    def write_final_scalars(self, step: int, scalars: dict[str, list[tuple[int, float]]]) -> None:
        """Post-training scalars, in their own VisualDL file of the run's log dir.

        PaddleNLP's VisualDL callback closes its writer at the end of training, so the
        final evaluation and the task metric would otherwise never reach VisualDL.
        ``scalars`` maps a tag to its (step, value) points.
        """
        if not self.is_main:
            return
        from visualdl import LogWriter

        with LogWriter(logdir=str(self.visualdl), file_name="vdlrecords.final.log") as writer:
            for tag, points in scalars.items():
                for at, value in points:
                    writer.add_scalar(tag, float(value), at)

    def write_method_record(self, method: str, base_model: str) -> None:
        """``final/ftlab_method.json``: what ``ftlab-predict`` and ``ftlab-merge`` reload."""
        if self.is_main:
            write_json_atomic(
                self.final / METHOD_RECORD, {"method": method, "base_model": base_model}
            )

    # ------------------------------------------------------------------ reads

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_json(self, name: str) -> dict[str, Any]:
        """The file's object, or {} when it does not exist."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_yaml(self, name: str) -> Any:
        """The file's YAML (interpolations left as plain strings), or {} when absent."""
        path = self.path / name
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def train_logs(self) -> list[dict[str, Any]]:
        """The per-step training lines of ``metrics.jsonl``."""
        return [x for x in self.read_jsonl(METRICS) if x.get("kind") == "train"]
