"""Sweeps: a failing job does not stop ``ftlab -m``, and the sweep summary records it.

The module fixture runs a real 3-job sweep through the ``ftlab`` command
(``method.lora_rank=2,4,0``; rank 0 fails validation); the other tests read what it left.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fake_runs import make_run, metrics
from helpers import run_ftlab_forked, without_paddle_vars

from ftlab.record.sweep import read_sweep, summary_rows, write_sweep_summary, x_axis

BIN = Path(sys.executable).parent
RANK0 = "method.lora_rank=0: the rank must be >= 1."
TINY = ["train.max_steps=6", "train.logging_steps=2", "eval.max_new_tokens=8"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cmd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = without_paddle_vars(os.environ)
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header; raises on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("cwd")
    sweep_dir = cwd / "sweep"
    proc = run_ftlab_forked(
        cwd, "-m", "method.lora_rank=2,4,0", *TINY, f"hydra.sweep.dir={sweep_dir}", check=False
    )
    return sweep_dir, proc


def job_dir(sweep_dir: Path, num: int) -> Path:
    (path,) = sweep_dir.glob(f"{num}_*")
    return path


def test_sweep_runs_every_job_and_reports_the_failure(sweep) -> None:
    sweep_dir, proc = sweep
    # A sweep with a failed job must not exit 0: every job ran, the summary is complete,
    # and the exit status says that something failed.
    assert proc.returncode == 1, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert f"job 2 failed: ConfigError: {RANK0}" in out
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ftlab: error: 1 of 3 jobs failed: job 2 (ConfigError: {RANK0}). Summary: "
        f"{sweep_dir / 'summary.md'}"
    )
    assert "Traceback" not in proc.stderr
    assert len(list(csv.DictReader(open(sweep_dir / "summary.csv")))) == 3
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "summary.png").is_file()
    # The console of a sweep: one line per job, then the summary; no job's own lines.
    lines = out.splitlines()
    for num in (0, 1):
        assert sum(x.startswith(f"job {num} done in ") for x in lines) == 1, out
    assert "sweep summary: 3 jobs (2 completed, 1 failed)" in out
    assert "PaddleNLP" not in out and "data   train" not in out and len(lines) <= 12, out
    assert sorted(p.name for p in sweep_dir.glob("*_*")) == [
        f"{n}_eval.max_new_tokens=8,method.lora_rank={r},train.logging_steps=2,train.max_steps=6"
        for n, r in ((0, 2), (1, 4), (2, 0))
    ]


def test_job_status_files(sweep) -> None:
    sweep_dir, _ = sweep
    failed = json.loads((job_dir(sweep_dir, 2) / "status.json").read_text())
    assert failed["status"] == "failed" and failed["job_num"] == 2
    assert failed["error_type"] == "ConfigError" and failed["error"] == RANK0
    assert failed["traceback"] == "error.txt" and failed["mode"] == "train"
    assert failed["overrides"] == ["method.lora_rank=0", *TINY]
    trace = (job_dir(sweep_dir, 2) / "error.txt").read_text()
    assert trace.startswith("Traceback") and trace.rstrip().endswith(f"ConfigError: {RANK0}")
    assert not (job_dir(sweep_dir, 2) / "summary.json").exists()
    for num in (0, 1):
        done = json.loads((job_dir(sweep_dir, num) / "status.json").read_text())
        assert done["status"] == "completed" and done["job_num"] == num
        assert "error" not in done and done["wall_seconds"] > 0


def test_summary_csv(sweep) -> None:
    sweep_dir, _ = sweep
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "job",
        "method.lora_rank",
        "status",
        "final_loss",
        "eval_loss",
        "entity_recall",
        "tokens_per_second",
        "peak_memory_mb",
        "wall_seconds",
        "run_dir",
        "error",
    ]
    assert len(rows) == 3
    assert [(r["job"], r["method.lora_rank"], r["status"]) for r in rows] == [
        ("0", "2", "completed"),
        ("1", "4", "completed"),
        ("2", "0", "failed"),
    ]
    failed = rows[2]
    assert failed["error"] == f"ConfigError: {RANK0}"
    assert [
        failed[k]
        for k in ("final_loss", "eval_loss", "entity_recall", "tokens_per_second", "peak_memory_mb")
    ] == [""] * 5
    assert failed["run_dir"] == job_dir(sweep_dir, 2).name
    for row in rows[:2]:
        summary = json.loads((sweep_dir / row["run_dir"] / "summary.json").read_text())
        assert row["error"] == "" and summary["steps"] == 6
        assert float(row["final_loss"]) == pytest.approx(summary["final_loss"])
        # Six steps of LoRA on the demo task already lower the loss from ~1.88.
        assert 0.5 < float(row["final_loss"]) < summary["first_loss"] < 2.5
        assert 0.5 < float(row["eval_loss"]) < 2.0
        assert 0.0 <= float(row["entity_recall"]) <= 1.0
        assert float(row["tokens_per_second"]) > 100
        assert 100 < float(row["peak_memory_mb"]) < 8000
        assert 0 < float(row["wall_seconds"]) < 120


def test_summary_markdown(sweep) -> None:
    sweep_dir, _ = sweep
    lines = (sweep_dir / "summary.md").read_text().splitlines()
    assert lines[0] == "# Sweep summary: sweep"
    assert "- jobs: 3 (2 completed, 1 failed)" in lines
    assert (
        "- common overrides: `train.max_steps=6` `train.logging_steps=2` `eval.max_new_tokens=8`"
    ) in lines
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == (
        "| job | method.lora_rank | status | final train loss | eval loss | "
        "entity recall | tokens/s | peak memory MiB | wall s | run dir | error |"
    )
    assert len(table) == 2 + 3
    assert table[4].startswith("| 2 | 0 | failed |  |  |  |  |  | ")
    assert table[4].endswith(f"| `{job_dir(sweep_dir, 2).name}` | ConfigError: {RANK0} |")


def test_summary_png(sweep) -> None:  # not fast: the module's sweep trains three jobs
    assert png_size(sweep[0] / "summary.png") == (1000, 700)


def test_ftlab_runs_on_real_run_dirs(sweep) -> None:
    sweep_dir, _ = sweep
    proc = run_cmd(sweep_dir, BIN / "ftlab-runs", ".", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = sorted(json.loads(proc.stdout), key=lambda r: r["run_dir"])
    assert [(r["status"], r["rank"], r["steps"]) for r in rows] == [
        ("completed", 2, 6),
        ("completed", 4, 6),
        ("failed", 0, 6),
    ]
    for row in rows:
        assert (row["model"], row["method"], row["lr"]) == ("stories260k", "lora", 0.01)
        assert (row["parallel"], row["precision"]) == ("single", "fp32")
    summary = json.loads((sweep_dir / rows[0]["run_dir"] / "summary.json").read_text())
    assert rows[0]["eval_loss"] == summary["eval_loss"]
    assert rows[2]["error"] == f"ConfigError: {RANK0}" and rows[2]["eval_loss"] is None
    table = run_cmd(sweep_dir, BIN / "ftlab-runs", ".").stdout
    assert table.splitlines()[-1] == f"  {rows[2]['run_dir']}: ConfigError: {RANK0}"


def test_single_run_failure_stays_a_clean_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cmd(tmp_path, BIN / "ftlab", "method.lora_rank=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"ftlab: error: {RANK0}"
    assert "Traceback" not in proc.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "job_num" not in status


@pytest.mark.fast
def test_summary_of_fake_grid_with_incomplete_job(tmp_path: Path) -> None:
    """Two swept keys: x is the one with more values, the other splits the lines."""
    sweep_dir = tmp_path / "sweep"
    grid = [("1e-3", 4), ("1e-2", 4), ("1e-1", 4), ("1e-3", 8), ("1e-2", 8)]
    for num, (lr, rank) in enumerate(grid):
        over = [f"train.learning_rate={lr}", f"method.lora_rank={rank}", "train.max_steps=6"]
        make_run(
            sweep_dir / f"{num}_x",
            over,
            f"2026-01-04T08:00:0{num}+00:00",
            job_num=num,
            metrics=metrics(1.0 + num / 10, 0.9 + num / 10),
        )
    make_run(
        sweep_dir / "5_x",
        ["train.learning_rate=1e-1", "method.lora_rank=8", "train.max_steps=6"],
        "2026-01-04T08:00:05+00:00",
        status=None,
        job_num=5,
    )
    sweep = read_sweep(sweep_dir)
    assert sweep.swept == ["train.learning_rate", "method.lora_rank"]
    assert sweep.common == ["train.max_steps=6"]
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 5 + ["incomplete"]
    axis = x_axis(rows, sweep)
    assert axis.label == "train.learning_rate" and axis.log
    assert axis.tick_labels == ["1e-3", "1e-2", "1e-1"]
    paths = write_sweep_summary(sweep)
    md = paths["md"].read_text()
    assert "- best eval loss: 0.9000, job 0 (train.learning_rate=1e-3, method.lora_rank=4)" in md
    assert "| 5 | 1e-1 | 8 | incomplete |" in md
    assert png_size(paths["png"]) == (1000, 700)


@pytest.mark.slow  # ~25 s: the submitit launcher's own processes
def test_submitit_launcher_runs_jobs_as_separate_processes(tmp_path: Path) -> None:
    """The SLURM option's machinery (hydra-submitit-launcher), through its local executor."""
    sweep_dir = tmp_path / "sweep"
    proc = run_cmd(
        tmp_path,
        BIN / "ftlab",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "method.lora_rank=2,4",
        "train.max_steps=2",
        "eval.demo_metric=false",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Each job ran in its own submitit process, which left its result and logs.
    assert len(list((sweep_dir / ".submitit").glob("*/*_0_result.pkl"))) == 2
    for num, rank in ((0, 2), (1, 4)):
        run_dir = job_dir(sweep_dir, num)
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "completed", status
        resolved = (run_dir / "resolved_config.yaml").read_text()
        assert f"lora_rank: {rank}\n" in resolved
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [r["status"] for r in rows] == ["completed", "completed"]


@pytest.mark.fast
def test_slurm_launcher_option_composes(tmp_path: Path) -> None:
    proc = run_cmd(
        tmp_path,
        BIN / "ftlab",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "parallel=dp8",
        "--cfg",
        "hydra",
        "--package",
        "hydra.launcher",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    for line in ("partition: gpu", "tasks_per_node: 1", "gpus_per_node: 8", "nodes: 1"):
        assert line in out, (line, out)
