"""Reading run directories back: what ``ftlab-runs`` lists and a sweep summary tabulates.

Everything comes from the files a run leaves behind (``.hydra/``, ``status.json``,
``summary.json``), never from a process that may be gone, so the listing works on a
copied ``outputs/`` tree and on runs that crashed half-way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ftlab.errors import FtlabError
from ftlab.methods.catalog import registered_methods
from ftlab.record.rundir import HYDRA, RESOLVED_CONFIG, STATUS, SUMMARY
from ftlab.record.status import INCOMPLETE, RUNNING, is_running
from ftlab.record.summary import Summary


class RunDirError(FtlabError):
    """A run dir's record file exists but cannot be parsed."""


@dataclass
class RunRecord:
    """One run directory as read from disk."""

    run_dir: Path
    status: str  # completed | failed | interrupted | running | incomplete
    started: datetime
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    job_num: int | None = None
    summary: Summary | None = None
    status_info: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str) -> Any:
        """A value of the composed config by dotted key (None when absent)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def rank(self) -> Any:
        """The size of the run's method (LoRA's rank, ...), as its ``Method`` names it."""
        method = self.config.get("method") or {}
        cls = registered_methods().get(method.get("name"))
        return cls().size(method) if cls is not None else None

    @property
    def error(self) -> str | None:
        """``Type: message`` of a failed run (None otherwise)."""
        if "error_type" not in self.status_info:
            return None
        return f"{self.status_info['error_type']}: {self.status_info.get('error', '')}"

    @property
    def wall_seconds(self) -> float | None:
        """The run's own wall time; for a failed run, the time until it failed."""
        value = self.summary.wall_seconds if self.summary else None
        return value if value is not None else self.status_info.get("wall_seconds")


def is_run_dir(path: Path) -> bool:
    """A directory Hydra made for one job, or one holding ftlab's run files."""
    return (path / HYDRA).is_dir() or any((path / name).is_file() for name in (STATUS, SUMMARY))


def find_runs(root: Path) -> list[Path]:
    """Every run dir under ``root`` (``root`` itself included); run dirs are not entered."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        path = Path(dirpath)
        if is_run_dir(path):
            found.append(path)
            dirnames[:] = []  # checkpoints/, final/, logs/ hold no runs
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def read_run(run_dir: Path) -> RunRecord:
    """Read a run dir; a missing file leaves its fields empty (an incomplete run).

    A file that exists but does not parse raises ``RunDirError``: a corrupt record is
    worth seeing, not worth guessing around.
    """
    status_info = _read_json(run_dir / STATUS)
    summary = _read_json(run_dir / SUMMARY)
    status = status_info.get("status") or summary.get("status") or INCOMPLETE
    if status == RUNNING and not is_running(status_info):
        status = INCOMPLETE  # its process is gone: killed
    config = _read_yaml(run_dir / HYDRA / "config.yaml") or _read_yaml(run_dir / RESOLVED_CONFIG)
    overrides = _read_yaml(run_dir / HYDRA / "overrides.yaml") or []
    hydra_cfg = _read_yaml(run_dir / HYDRA / "hydra.yaml")
    job_num = status_info.get("job_num")
    if job_num is None and (hydra_cfg.get("hydra") or {}).get("mode") == "MULTIRUN":
        job_num = hydra_cfg["hydra"]["job"].get("num")
    return RunRecord(
        run_dir=run_dir,
        status=status,
        started=_start_time(run_dir, status_info),
        config=config or {},
        overrides=[str(o) for o in overrides],
        job_num=job_num,
        summary=Summary.from_dict(summary) if summary else None,
        status_info=status_info,
    )


def list_runs(root: Path) -> list[RunRecord]:
    """All runs under ``root``, newest first."""
    runs = [read_run(p) for p in find_runs(root)]
    return sorted(runs, key=lambda r: (r.started, str(r.run_dir)), reverse=True)


def _start_time(run_dir: Path, status_info: dict[str, Any]) -> datetime:
    # status.json knows; otherwise Hydra writes .hydra/config.yaml as the job starts.
    if status_info.get("started_at"):
        return datetime.fromisoformat(status_info["started_at"])
    marker = run_dir / HYDRA / "config.yaml"
    stamp = (marker if marker.exists() else run_dir).stat().st_mtime
    return datetime.fromtimestamp(stamp).astimezone()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err}).") from err


def _read_yaml(path: Path) -> Any:
    # safe_load, not OmegaConf: interpolations such as ${asset:...} stay plain strings.
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RunDirError(f"{path}: not valid YAML ({err}).") from err
