"""Run dirs shaped like the ones ``ftlab`` writes, without training anything.

The composed config comes from the real ``conf/`` (so ``.hydra/config.yaml`` has the
real structure); status.json and summary.json carry the fields the runner writes.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from helpers import compose_cfg
from omegaconf import OmegaConf


def make_run(
    run_dir: Path,
    overrides: list[str],
    started: str,
    status: str | None = "completed",
    metrics: dict[str, Any] | None = None,
    job_num: int | None = None,
    error: tuple[str, str] | None = None,
    hydra_dir: bool = True,
) -> Path:
    """One run dir. ``status=None`` leaves out status.json; ``metrics`` writes a
    summary.json; ``error`` is (type, message) of a failed run."""
    run_dir.mkdir(parents=True)
    started_at = datetime.fromisoformat(started)
    if hydra_dir:
        hydra = run_dir / ".hydra"
        hydra.mkdir()
        (hydra / "config.yaml").write_text(OmegaConf.to_yaml(compose_cfg(overrides)))
        (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        mode = "RUN" if job_num is None else "MULTIRUN"
        hydra_cfg = {"hydra": {"mode": mode, "job": {"num": job_num or 0}}}
        (hydra / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
        os.utime(hydra / "config.yaml", (started_at.timestamp(), started_at.timestamp()))
    if status is not None:
        info: dict[str, Any] = {
            "status": status,
            "started_at": started,
            "finished_at": started,
            "wall_seconds": 3.5,
            "mode": "train",
            "overrides": overrides,
        }
        if job_num is not None:
            info["job_num"] = job_num
        if error is not None:
            info.update(error_type=error[0], error=error[1], traceback="error.txt")
            (run_dir / "error.txt").write_text(f"Traceback ...\n{error[0]}: {error[1]}\n")
        (run_dir / "status.json").write_text(json.dumps(info))
    if metrics is not None:
        summary = {
            "run_dir": str(run_dir),
            "status": "completed",
            "model": "stories260k",
            "method": "lora",
            "steps": 6,
            "first_loss": 1.8785,
            "train_loss_mean": 1.74,
            "eval_ppl": 3.89,
            "entity_recall_base": 0.007,
            "effective_tokens_per_second": 4149.6,
            "train_seconds": 2.58,
            "wall_seconds": 4.74,
            **metrics,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    stamp = started_at.timestamp()
    os.utime(run_dir, (stamp, stamp))  # what dates a run dir that has no .hydra/
    return run_dir


def metrics(final: float, eval_loss: float, recall: float | None = 0.25) -> dict[str, Any]:
    return {
        "final_loss": final,
        "eval_loss": eval_loss,
        "entity_recall": recall,
        "tokens_per_second": 4731.08,
        "peak_memory_mb": 772.8,
    }
