"""Finished work is never lost to a later command (issue 31): predict's --output, a sweep
summary over one run, and two resumes of one run dir at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_runs import make_run, metrics

from ftlab.cli import predict, sweep
from ftlab.errors import ConfigError
from ftlab.record.resume import check_resumable
from ftlab.record.rundir import lock_run_dir

STARTED = "2026-12-01T10:00:00"


def finished(path: Path) -> Path:
    return make_run(path, ["method=lora"], STARTED, metrics=metrics(1.5, 1.6))


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


@pytest.mark.parametrize("where", ["summary", "nested", "input"])
def test_predict_refuses_an_output_in_a_run_dir_or_over_its_input(tmp_path, capsys, where):
    run = finished(tmp_path / "run")
    other = finished(tmp_path / "other")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"src": "a story"}\n')
    output = {
        "summary": other / "summary.json",
        "nested": other / "final" / "gen.jsonl",
        "input": prompts,
    }[where]
    before = snapshot(tmp_path)
    code = predict.main([str(run), "--input", str(prompts), "--output", str(output)])
    assert code == 2
    line = one_error(capsys, "ftlab-predict")
    assert ("is the --input file" if where == "input" else f"inside the run dir {other}") in line
    assert snapshot(tmp_path) == before  # nothing written, no model loaded


@pytest.mark.parametrize("kind", ["run", "empty"])
def test_sweep_summary_is_not_written_into_a_single_run_or_an_empty_dir(tmp_path, capsys, kind):
    target = finished(tmp_path / "run") if kind == "run" else tmp_path
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        sweep.main([str(target)])
    assert exit_.value.code == 2
    assert "nothing was written" in one_error(capsys, "ftlab-sweep")
    assert snapshot(tmp_path) == before


def test_a_run_dir_held_by_another_process_cannot_be_resumed(tmp_path):
    run = make_run(tmp_path / "run", ["method=lora"], STARTED, status="interrupted")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another ftlab process is using this run dir"):
            check_resumable(run, [])
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while not lock_run_dir(run):  # released by the kernel when its owner died
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
