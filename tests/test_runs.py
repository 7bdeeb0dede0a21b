"""``ftlab-runs`` on a tree of fake-but-realistic run dirs (the real ones: test_sweep.py)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from fake_runs import make_run, metrics

from ftlab.cli.runs import main
from ftlab.record.index import find_runs, read_run

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

RANK0 = "method.lora_rank=0: the rank must be >= 1."


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """The listing shows local time; pin it so the expected strings hold anywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    make_run(
        root / "2026-01-02/10-00-00_stories260k_lora",
        ["train.max_steps=6"],
        "2026-01-02T10:00:00+00:00",
        metrics=metrics(1.5437, 1.3588),
    )
    make_run(
        root / "2026-01-02/11-00-00_stories260k_lora",
        ["method.lora_rank=0"],
        "2026-01-02T11:00:00+00:00",
        status="failed",
        error=("ConfigError", RANK0),
    )
    # Killed before it recorded anything: only Hydra's .hydra/ (dated by its mtime).
    make_run(
        root / "2026-01-03/09-00-00_llama3_qlora",
        ["model=llama3", "method=qlora", "precision=bf16", "parallel=tp4"],
        "2026-01-03T09:00:00+00:00",
        status=None,
    )
    sweep = root / "multirun/2026-01-04/08-00-00"
    for num, rank, lr in ((0, 4, "3e-3"), (1, 16, "1e-2")):
        over = [f"method.lora_rank={rank}", f"train.learning_rate={lr}"]
        make_run(
            sweep / f"{num}_{','.join(over)}",
            over,
            f"2026-01-04T08:00:0{num}+00:00",
            job_num=num,
            metrics=metrics(1.2 + num, 1.1 + num, None),
        )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # A dir with a summary but no .hydra/ nor status.json (written by other means).
    make_run(
        root / "archive/full_run",
        ["method=full"],
        "2026-01-01T00:00:00+00:00",
        status=None,
        hydra_dir=False,
        metrics={**metrics(2.0, 1.9), "method": "full"},
    )
    return root


def test_find_runs_skips_sweep_dirs_and_run_contents(outputs: Path) -> None:
    (outputs / "2026-01-02/10-00-00_stories260k_lora/final").mkdir()
    found = sorted(str(p.relative_to(outputs)) for p in find_runs(outputs))
    assert found == [
        "2026-01-02/10-00-00_stories260k_lora",
        "2026-01-02/11-00-00_stories260k_lora",
        "2026-01-03/09-00-00_llama3_qlora",
        "archive/full_run",
        "multirun/2026-01-04/08-00-00/0_method.lora_rank=4,train.learning_rate=3e-3",
        "multirun/2026-01-04/08-00-00/1_method.lora_rank=16,train.learning_rate=1e-2",
    ]


def test_read_run_fields(outputs: Path) -> None:
    run = read_run(
        outputs / "multirun/2026-01-04/08-00-00/1_method.lora_rank=16,train.learning_rate=1e-2"
    )
    assert run.status == "completed" and run.job_num == 1 and run.rank == 16
    assert run.setting("train.learning_rate") == 1e-2
    assert run.overrides == ["method.lora_rank=16", "train.learning_rate=1e-2"]
    failed = read_run(outputs / "2026-01-02/11-00-00_stories260k_lora")
    assert failed.status == "failed" and failed.error == f"ConfigError: {RANK0}"
    assert failed.job_num is None and failed.wall_seconds == 3.5
    incomplete = read_run(outputs / "2026-01-03/09-00-00_llama3_qlora")
    assert incomplete.status == "incomplete"
    assert incomplete.started == datetime.fromisoformat("2026-01-03T09:00:00+00:00")
    assert incomplete.setting("model.name") == "llama3" and incomplete.rank == 8


def test_listing_newest_first_with_settings_and_status(outputs: Path, capsys) -> None:
    main([str(outputs)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "time",
        "status",
        "model",
        "method",
        "stage",
        "lr",
        "steps",
        "rank",
        "parallel",
        "precision",
        "loss",
        "eval",
        "recall",
        "run",
        "dir",
    ]
    rows = [line.split() for line in lines[1:7]]
    assert [r[2] for r in rows] == [
        "completed",
        "completed",
        "incomplete",
        "failed",
        "completed",
        "completed",
    ]
    assert rows[0] == [
        "2026-01-04",
        "08:00:01",
        "completed",
        "stories260k",
        "lora",
        "sft",
        "0.01",
        "6",
        "16",
        "single",
        "fp32",
        "2.2000",
        "2.1000",
        "-",
        "multirun/2026-01-04/08-00-00/1_method.lora_rank=16,train.learning_rate=1e-2",
    ]
    # No summary: steps is the configured train.max_steps, losses are "-".
    assert rows[2][3:] == [
        "llama3",
        "qlora",
        "sft",
        "0.01",
        "40",
        "8",
        "tp4",
        "bf16",
        "-",
        "-",
        "-",
        "2026-01-03/09-00-00_llama3_qlora",
    ]
    assert rows[3][2:10] == ["failed", "stories260k", "lora", "sft", "0.01", "40", "0", "single"]
    assert rows[4][2:] == [
        "completed",
        "stories260k",
        "lora",
        "sft",
        "0.01",
        "6",
        "8",
        "single",
        "fp32",
        "1.5437",
        "1.3588",
        "0.250",
        "2026-01-02/10-00-00_stories260k_lora",
    ]
    assert rows[5][2:] == [
        "completed",
        "stories260k",
        "full",
        "sft",
        "-",
        "6",
        "-",
        "-",
        "-",
        "2.0000",
        "1.9000",
        "0.250",
        "archive/full_run",
    ]
    assert lines[7:] == [
        "",
        "failed runs:",
        f"  2026-01-02/11-00-00_stories260k_lora: ConfigError: {RANK0}",
    ]


def test_json_filter_and_limit(outputs: Path, capsys) -> None:
    main([str(outputs), "--json", "--status", "completed", "-n", "2"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_dir"].split("/")[-1][:2] for r in rows] == ["1_", "0_"]
    assert rows[1]["lr"] == 0.003 and rows[1]["rank"] == 4 and rows[1]["eval_loss"] == 1.1
    assert rows[1]["time"] == "2026-01-04 08:00:00" and rows[1]["error"] is None


def test_errors(tmp_path: Path, outputs: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "is not a directory" in capsys.readouterr().err
    (outputs / "2026-01-02/10-00-00_stories260k_lora/summary.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main([str(outputs)])
    assert "10-00-00_stories260k_lora/summary.json: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    main([str(empty)])
    assert capsys.readouterr().out == f"no runs under {empty}\n"
