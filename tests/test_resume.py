"""Resume and rerun: a killed run continues to the same losses and weights as one never
interrupted; a kill during a checkpoint save never leaves a checkpoint resume would use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import FTLAB, run_ftlab_forked, without_paddle_vars

ARGS = [
    "train.max_steps=16",
    "train.save_steps=4",
    "train.logging_steps=1",
    "train.per_device_train_batch_size=8",
    "eval.demo_metric=false",
    "eval.generation=false",  # ~2.9 s CPU per run; the eval loss is still computed
]

# Runs ftlab with a Trainer whose save of checkpoint-12 stops half-way (model written,
# optimizer and trainer state not yet), signals the test, and waits to be killed.
SLOW_SAVE = """
import os, sys, time
import paddlenlp.trainer.trainer as T
original = T.Trainer.save_model
def save_model(self, output_dir=None, *args, **kwargs):
    original(self, output_dir, *args, **kwargs)
    if str(output_dir).endswith("checkpoint-12"):
        open(os.environ["FTLAB_TEST_MARK"], "w").close()
        time.sleep(600)
T.Trainer.save_model = save_model
from ftlab.cli.app import main
sys.argv = ["ftlab", *sys.argv[1:]]
main()
"""


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "final/peft_model-00001-of-00001.safetensors"))


def env() -> dict[str, str]:
    return without_paddle_vars(os.environ)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    start = time.time()
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - start < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ref")
    run_ftlab_forked(cwd, *ARGS, "hydra.run.dir=run")
    return cwd / "run"


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = losses(reference), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    ref_w, res_w = adapter(reference), adapter(resumed)
    assert sorted(ref_w) == sorted(res_w)
    assert max(float(np.abs(ref_w[k] - res_w[k]).max()) for k in ref_w) <= 1e-6
    ref_s = json.loads((reference / "summary.json").read_text())
    res_s = json.loads((resumed / "summary.json").read_text())
    # The mean over all 16 steps, not only those after the resume.
    assert res_s["train_loss_mean"] == pytest.approx(ref_s["train_loss_mean"], abs=1e-6)


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(FTLAB), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(proc, lambda: (run_dir / "checkpoints/checkpoint-8").is_dir())
    assert not (run_dir / "summary.json").exists()
    proc = run_ftlab_forked(tmp_path, f"resume={run_dir}")
    assert (
        "checkpoint-8"
        in json.loads((run_dir / "summary.json").read_text())["derived"]["resumed_from"]
        or "checkpoint-12" in proc.stdout + proc.stderr
    )
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow  # ~40 s; the staging rename is also covered by the disk-full save test
def test_kill_during_save_is_never_resumed_from(uninterrupted, tmp_path):
    run_dir, mark = tmp_path / "run", tmp_path / "saving"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={**env(), "FTLAB_TEST_MARK": str(mark)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when(proc, mark.exists)
    # The half-written checkpoint exists only under its temporary name.
    assert (run_dir / "checkpoints/.staging/checkpoint-12").is_dir()
    assert not (run_dir / "checkpoints/checkpoint-12").exists()
    run_ftlab_forked(tmp_path, f"resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["derived"]["resumed_from"].endswith("checkpoint-8")
    assert not (run_dir / "checkpoints/.staging").exists()
    assert_same_run(run_dir, uninterrupted)


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir``: its bytes and modification time."""
    return {
        str(f.relative_to(run_dir)): (f.read_bytes(), f.stat().st_mtime_ns)
        for f in sorted(run_dir.rglob("*"))
        if f.is_file()
    }


RECORD = ("status.json", "environment.json", "resolved_config.yaml", "summary.json")


# ~30 s; the refusals themselves are checked without training in the default suite
# (tests/test_architecture.py, tests/test_elastic.py), and a resume that changes nothing
# in a finished run by test_resume_of_a_finished_run_changes_nothing.
@pytest.mark.slow
def test_resume_refuses_a_changed_method_and_warns_on_other_changes(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    before = snapshot(run_dir)
    proc = run_ftlab_forked(
        tmp_path, f"resume={run_dir}", "train.max_steps=20", "method.lora_rank=4", check=False
    )
    assert proc.returncode == 2
    assert "cannot change on resume" in proc.stderr and "method.lora_rank: 8 -> 4" in proc.stderr
    # The resume never started: the finished run's record is exactly as it was.
    after = snapshot(run_dir)
    assert {n: after[n] for n in RECORD} == {n: before[n] for n in RECORD}
    proc = run_ftlab_forked(
        tmp_path, f"resume={run_dir}", "train.max_steps=20", "train.save_steps=0"
    )
    out = proc.stdout + proc.stderr
    assert f"resume={run_dir}: the run completed 16 steps; continuing to train.max_steps=20" in out
    assert "resume with a changed setting: train.max_steps: 16 -> 20" in out
    assert max(losses(run_dir)) == 20


def test_resume_of_a_finished_run_changes_nothing(uninterrupted, tmp_path):
    """Resuming a finished run trains no step past max_steps and rewrites no result."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    before = snapshot(run_dir)
    for more in ([], ["train.max_steps=16"]):
        proc = run_ftlab_forked(tmp_path, f"resume={run_dir}", *more)
        assert proc.stdout.strip() == (
            f"ftlab: resume={run_dir}: the run is finished (status completed after 16 steps, "
            "final/ written); nothing to do, and nothing in it was changed. To train it "
            "further, add train.max_steps=N with N > 16."
        )
        assert snapshot(run_dir) == before


@pytest.mark.slow
def test_resume_from_the_last_step_trains_no_step_beyond_max_steps(uninterrupted, tmp_path):
    """No step past max_steps, for a run stopped after its last checkpoint (before its summary):
    PaddleNLP's train() resumed at max_steps would train one step more; ftlab loads the
    checkpoint and finishes the run without training."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    (run_dir / "status.json").unlink()
    run_ftlab_forked(tmp_path, f"resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["derived"]["resumed_from"].endswith("checkpoint-16")
    assert max(losses(run_dir)) == 16
    assert_same_run(run_dir, uninterrupted)
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-6)


def test_damaged_checkpoint_is_named_and_the_previous_one_taken(uninterrupted, tmp_path):
    """A truncated newest checkpoint gives no bare SafeTensorError after a rewritten record:
    nothing changes until a whole checkpoint is found; the damaged file is named; the
    previous checkpoint is taken and the run ends as the uninterrupted one did."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    newest = run_dir / "checkpoints/checkpoint-16/peft_model-00001-of-00001.safetensors"
    older = run_dir / "checkpoints/checkpoint-12/optimizer-00001-of-00001.safetensors"
    whole = older.read_bytes()
    newest.write_bytes(newest.read_bytes()[:1000])
    older.write_bytes(whole[:100])
    before = snapshot(run_dir)
    proc = run_ftlab_forked(tmp_path, f"resume={run_dir}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{newest} is damaged: truncated" in proc.stderr
    assert f"{older} is damaged: truncated" in proc.stderr
    assert snapshot(run_dir) == before  # checked before Hydra wrote anything

    older.write_bytes(whole)
    proc = run_ftlab_forked(tmp_path, f"resume={run_dir}")
    assert (
        f"warning: checkpoint-16 is unusable: {newest} is damaged: truncated: its header "
        "alone needs" in proc.stdout
    )
    assert "resuming from checkpoint-12 instead: steps 13-16 are trained again" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["derived"]["resumed_from"].endswith("checkpoint-12")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow  # ~40 s: two more ftlab runs
def test_rerun_reproduces_losses_and_reports_differences(uninterrupted, tmp_path):
    proc = run_ftlab_forked(tmp_path, f"rerun={uninterrupted}", "hydra.run.dir=again")
    again = tmp_path / "again"
    assert losses(again) == losses(uninterrupted)  # exact on CPU
    assert f"rerun of {uninterrupted}" in proc.stdout or "rerun differs" in proc.stdout
    resolved = (again / "resolved_config.yaml").read_text()
    assert f"rerun_of: {uninterrupted}" in resolved
    # A changed data file is reported before training starts.
    data = tmp_path / "data"
    data.mkdir()
    from ftlab.assets import asset_path

    for split in ("train.json", "dev.json"):
        (data / split).write_text((asset_path("demo_stories") / split).read_text())
    with open(data / "dev.json", "a") as f:
        f.write(json.dumps({"src": "Write a story.", "tgt": "Once upon a time."}) + "\n")
    proc = run_ftlab_forked(
        tmp_path,
        f"rerun={uninterrupted}",
        f"data.path={data}",
        "train.max_steps=2",
        "hydra.run.dir=changed",
    )
    assert "rerun differs from the recorded run: data file" in proc.stdout
