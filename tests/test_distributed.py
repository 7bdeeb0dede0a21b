"""Real ``ftlab`` runs with 2 gloo processes on CPU: same losses as one process, one run dir.

Data parallel and sharding: the single-process run uses ``per_device_train_batch_size=8``,
the two-process runs 4 per rank, so every step trains on the same global batch of 8.
Tensor and pipeline parallel (CPU emulation): both ranks see the same batch of 4, as one
process does.
It is tested with full fine-tuning: under tensor parallelism PaddleNLP draws the LoRA
factors of row-parallel layers per rank, so LoRA starts from different random factors than
a single process does (with equal factors, losses and gradients agree).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

COMMON = [
    "train.max_steps=3",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "eval.demo_metric=false",
    "train.per_device_eval_batch_size=8",
    "device=cpu",
]
TOLERANCE = 1e-5
# Per rank: its complete log (train.N.log) and its console (workerlog.N, Paddle's launcher).
RANK_LOGS = ["train.0.log", "train.1.log", "workerlog.0", "workerlog.1"]


def ftlab(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    return subprocess.run(
        [sys.executable, "-m", "ftlab.cli.app", *COMMON, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def only_run_dir(cwd: Path) -> Path:
    """The one experiment directory a job made under cwd/outputs/<date>/."""
    dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    cwd = tmp_path_factory.mktemp("single")
    proc = ftlab(cwd, "parallel=single", "train.per_device_train_batch_size=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = train_losses(only_run_dir(cwd))
    assert len(losses) == 3
    return losses


# dp2 in the default suite; sharding stage 1 (the same claim, ~30 s more) is slow.
@pytest.mark.parametrize("layout", ["dp2", pytest.param("sharding_stage1", marks=pytest.mark.slow)])
def test_two_processes_match_single_process(
    layout: str, single_losses: list[float], tmp_path: Path
) -> None:
    proc = ftlab(tmp_path, f"parallel={layout}", "train.per_device_train_batch_size=4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    losses = train_losses(run_dir)
    assert len(losses) == len(single_losses)
    for step, (a, b) in enumerate(zip(losses, single_losses, strict=True), start=1):
        assert abs(a - b) <= TOLERANCE, (layout, step, a, b)
    # One job, one experiment dir: the launcher's .hydra/, rank 0's files, per-rank logs,
    # and no environment dumps.
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    assert (run_dir / "summary.json").exists() and (run_dir / "resolved_config.yaml").exists()
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == RANK_LOGS, logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["run_dir"] == str(run_dir)
    # The console is rank 0's, once; every rank's complete log is in the run dir.
    assert proc.stdout.count("ftlab summary") == 1 and proc.stdout.count("train  3 steps") == 1
    assert "[PaddleNLP]" not in proc.stdout and "LAUNCH INFO" not in proc.stdout
    for rank in (0, 1):
        assert (
            "Training Configuration Arguments"
            in (run_dir / "logs" / f"train.{rank}.log").read_text()
        )


FULL_BATCH4 = ["method=full", "train.per_device_train_batch_size=4"]


@pytest.fixture(scope="module")
def single_full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full fine-tuning in one process, batch 4: what tp2 and pp2 (batch 4 each) must match."""
    cwd = tmp_path_factory.mktemp("single_full")
    proc = ftlab(cwd, "parallel=single", *FULL_BATCH4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return only_run_dir(cwd)


def emulated_run_matching(layout: str, single_dir: Path, cwd: Path) -> Path:
    """Run ``layout`` under the CPU emulation; assert its per-step losses equal one process's."""
    proc = ftlab(cwd, f"parallel={layout}", "parallel.cpu_emulation=true", *FULL_BATCH4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only_run_dir(cwd)
    single, emulated = train_losses(single_dir), train_losses(run_dir)
    assert len(emulated) == len(single) == 3
    for step, (a, b) in enumerate(zip(emulated, single, strict=True), start=1):
        assert abs(a - b) <= TOLERANCE, (layout, step, a, b)
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == RANK_LOGS, logs
    return run_dir


def test_tensor_parallel_emulation_matches_single_process(
    single_full_run: Path, tmp_path: Path
) -> None:
    run_dir = emulated_run_matching("tp2", single_full_run, tmp_path)
    # Each rank holds half of every linear layer and of the vocabulary.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["parameters"]["total"] < 0.6 * 260_032


def test_pipeline_emulation_matches_single_process(single_full_run: Path, tmp_path: Path) -> None:
    run_dir = emulated_run_matching("pp2", single_full_run, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    single_summary = json.loads((single_full_run / "summary.json").read_text())
    # Evaluation runs through the pipeline too (eval batches of 8, training micro-batches of 4).
    assert abs(summary["eval_loss"] - single_summary["eval_loss"]) <= TOLERANCE
    # Rank 0 holds the first stage only: the embedding and some of the 5 layers.
    assert summary["parameters"]["total"] < 0.8 * 260_032
    assert summary["derived"]["pipeline_micro_batch_size"] == 4
    assert summary["derived"]["pipeline_accumulate_steps"] == 1
    # The saved model is whole (both stages), loadable as a plain causal LM.
    from safetensors.numpy import load_file

    saved: dict = {}
    for f in (run_dir / "final").glob("*.safetensors"):
        saved.update(load_file(str(f)))
    assert "llama.embed_tokens.weight" in saved and "llama.norm.weight" in saved
    assert {f"llama.layers.{i}.mlp.up_proj.weight" for i in range(5)} <= set(saved)


@pytest.mark.slow  # a two-process job (~15 s); worker failures are also unit-tested
def test_worker_failure_fails_the_job_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.json").write_text("{oops\n")  # the workers fail reading it
    (broken / "dev.json").write_text(json.dumps({"src": "a", "tgt": "b"}) + "\n")
    proc = ftlab(
        tmp_path, "parallel=dp2", "train.per_device_train_batch_size=4", f"data.path={broken}"
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert "parallel=dp2: the distributed job failed" in err
    assert "failed (exit 2)" in err and "workerlog." in err
    assert f"{broken}/train.json:1: not valid JSON" in err  # the worker's own error, from its log
    run_dir = only_run_dir(tmp_path)
    assert not list((run_dir / "logs").glob("envlog.*"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two launchers and their workers (~60 s)
def test_two_nodes_on_this_machine_match_single_process(
    single_losses: list[float], tmp_path: Path
) -> None:
    """Two ftlab launchers as two nodes (one process each) rendezvous on the loopback
    address, as launch/multinode.sh runs them on a cluster: one run dir, the losses of the
    single process with the same global batch, each node's worker logs kept."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "ftlab.cli.app",
        *COMMON,
        "parallel=dp2",
        "parallel.nproc_per_node=1",
        "train.per_device_train_batch_size=4",
        "launch.nnodes=2",
        f"launch.master=127.0.0.1:{free_port()}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    nodes = [
        subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    losses = train_losses(run_dir)
    assert len(losses) == len(single_losses)
    for step, (a, b) in enumerate(zip(losses, single_losses, strict=True), start=1):
        assert abs(a - b) <= TOLERANCE, (step, a, b)
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.glob("train.*.log")) == ["train.0.log", "train.1.log"]
    node_dirs = sorted(p for p in logs.glob("node-*") if p.is_dir())
    assert len(node_dirs) == 2, sorted(logs.iterdir())
    assert all((d / "workerlog.0").is_file() for d in node_dirs)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed"
    assert json.loads((run_dir / "summary.json").read_text())["derived"]["world_size"] == 2
