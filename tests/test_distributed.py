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
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, run_ftlab_forked, without_paddle_vars

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
    env = without_paddle_vars(os.environ)
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
    # One process: forked from the test's ftlab server (no Paddle import of its own).
    proc = run_ftlab_forked(
        cwd, *COMMON, "parallel=single", "train.per_device_train_batch_size=8", check=False
    )
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
    proc = run_ftlab_forked(cwd, *COMMON, "parallel=single", *FULL_BATCH4, check=False)
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


# ~45 s: the emulation's claim (same losses as one process) stays in the default suite
# through the pipeline layout; the tensor-parallel one runs with the slow tests.
@pytest.mark.slow
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


@pytest.mark.slow  # two launchers and their workers (~60 s)
def test_two_nodes_on_this_machine_match_single_process(
    single_losses: list[float], tmp_path: Path
) -> None:
    """Two ftlab launchers as two nodes (one process each) rendezvous on the loopback
    address, as launch/multinode.sh runs them on a cluster: one run dir, the losses of the
    single process with the same global batch, each node's worker logs kept."""
    run_dir = tmp_path / "run"
    args = node_command(run_dir, f"127.0.0.1:{free_port()}")
    env = without_paddle_vars(os.environ)
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


def node_command(run_dir: Path, master: str, *extra: str) -> list[str]:
    """One node of a two-node job (one process each) sharing ``run_dir``; ``extra``
    overrides replace COMMON's of the same key."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [
        sys.executable,
        "-m",
        "ftlab.cli.app",
        *(c for c in COMMON if c.split("=", 1)[0] not in keys),
        "parallel=dp2",
        "parallel.nproc_per_node=1",
        "train.per_device_train_batch_size=4",
        "launch.nnodes=2",
        f"launch.master={master}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start_node(cmd: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """Start one node; its stdout and stderr go to files (``stderr_of``), so that a long
    run never blocks on a full pipe nobody reads."""
    env = without_paddle_vars(os.environ)
    with open(cwd / f"{name}.out", "w") as out, open(cwd / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)


def stderr_of(cwd: Path, name: str) -> str:
    return (cwd / f"{name}.err").read_text()


def wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[float]:
    """Wait for every node; the seconds until each one exited (from this call)."""
    started, exits = time.monotonic(), [0.0] * len(nodes)
    pending = set(range(len(nodes)))
    while pending and time.monotonic() - started < timeout:
        for i in list(pending):
            if nodes[i].poll() is not None:
                exits[i] = time.monotonic() - started
                pending.discard(i)
        time.sleep(0.1)
    assert not pending, f"nodes {sorted(pending)} still running after {timeout} s"
    return exits


def job_processes(run_dir: Path) -> str:
    """Processes whose command line names the run dir (launchers, Paddle's, workers)."""
    found = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True)
    return found.stdout.strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


ENV_DUMP_PATTERNS = ("envlog.*", "backup_env.*", "ftlab.*.log")


@pytest.mark.slow  # two launchers training until a checkpoint exists (~60-90 s)
def test_a_killed_node_worker_fails_both_launchers_naming_its_rank(tmp_path: Path) -> None:
    """SIGKILL of one node's worker mid-run, after a checkpoint: both launchers exit 2
    within a bound, both name the killed job rank and its host, nothing of the job keeps
    running, status.json says failed with the rank, the checkpoint stays resumable and no
    environment dump is left."""
    from ftlab.record.resume import checkpoint_step, pick_checkpoint

    run_dir = tmp_path / "run"
    cmd = node_command(
        run_dir, f"127.0.0.1:{free_port()}", "train.max_steps=400", "train.save_steps=2"
    )
    nodes = [start_node(cmd, tmp_path, f"node{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 400
        while not list(run_dir.glob("checkpoints/checkpoint-*")):
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            assert all(n.poll() is None for n in nodes), stderr_of(tmp_path, "node0")
            time.sleep(0.5)
        records = [json.loads(p.read_text()) for p in run_dir.glob("logs/node-*/worker.*.json")]
        pids = {r["rank"]: r["pid"] for r in records}
        assert sorted(pids) == [0, 1], records
        os.kill(pids[1], signal.SIGKILL)
        exits = wait_all(nodes, timeout=120)
        outputs = [stderr_of(tmp_path, f"node{i}") for i in range(2)]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    print(f"launchers exited {exits[0]:.1f} s and {exits[1]:.1f} s after the kill")
    assert [n.returncode for n in nodes] == [2, 2], outputs
    # Measured here 1.4-4.5 s; the bound leaves room for a loaded machine and the
    # surviving node's wait for the other node's report (15 s at most).
    assert max(exits) < 30, exits
    host = socket.gethostname()
    for err in outputs:
        assert "Traceback" not in err, err
        assert re.search(
            rf"Rank 1 \(host {re.escape(host)}, (local rank 0, )?logs/node-[^)]+\) failed "
            r"\(killed by SIGKILL, exit -9\)",
            err,
        ), err
    # One node says its own worker was killed; the other that its worker lost the peer.
    assert sum("stopped because its collective peer was gone" in e for e in outputs) == 1
    assert not any(alive(pid) for pid in pids.values())
    assert job_processes(run_dir) == ""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["failed_rank"] == 1, status
    assert status["failed_host"] == host and status["failed_exit"] == -9
    checkpoint, problems = pick_checkpoint(run_dir)
    assert checkpoint_step(checkpoint) >= 2 and problems == []
    dumps = [p for pattern in ENV_DUMP_PATTERNS for p in run_dir.rglob(pattern)]
    assert dumps == []


@pytest.mark.slow  # one launcher waiting out the rendezvous (~25-30 s each)
@pytest.mark.parametrize("alone", [True, False], ids=["node-alone", "unroutable-master"])
def test_a_master_that_never_answers_times_out_naming_it(alone: bool, tmp_path: Path) -> None:
    """A node started alone (it becomes the master on 127.0.0.1 and no one joins), or a
    master on an address nothing answers from (TEST-NET-1, never routed): one line naming
    the master and the bound, exit 2, nothing left running."""
    master = f"127.0.0.1:{free_port()}" if alone else "192.0.2.1:8090"
    run_dir = tmp_path / "run"
    started = time.monotonic()
    node = start_node(
        node_command(run_dir, master, "launch.rendezvous_timeout=15"), tmp_path, "node"
    )
    try:
        wait_all([node], timeout=120)
        err = stderr_of(tmp_path, "node")
    finally:
        if node.poll() is None:
            node.kill()
    elapsed = time.monotonic() - started
    print(f"exit {node.returncode} after {elapsed:.1f} s")
    assert node.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    said = "answers, but 1 of 2 nodes joined" if alone else "no answer from the master"
    assert lines[0].startswith("ftlab: error: launch.nnodes=2: "), lines
    assert said in lines[0] and f"launch.master={master}" in lines[0], lines
    assert "within launch.rendezvous_timeout=15 s" in lines[0]
    assert 15 <= elapsed < 15 + 30, elapsed  # the timeout, plus start-up and the probe
    assert job_processes(run_dir) == ""
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error_type"] == "RendezvousTimeout"


@pytest.mark.slow  # two launchers up to the config check (~25 s)
def test_nodes_given_different_overrides_are_refused_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    master = f"127.0.0.1:{free_port()}"
    nodes = [
        start_node(node_command(run_dir, master, *extra), tmp_path, f"node{i}")
        for i, extra in enumerate([[], ["train.learning_rate=0.001"]])
    ]
    try:
        wait_all(nodes, timeout=300)
        outputs = [stderr_of(tmp_path, f"node{i}") for i in range(2)]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [2, 2], outputs
    # Rank 0 is the node that became the master, either of the two.
    refusal = re.compile(
        r"ftlab: error: the nodes of this job were given different configs; first difference: "
        r"train\.learning_rate: (0\.01|0\.001) \(rank 0 on host \S+\) vs (0\.001|0\.01) "
        r"\(rank 1 on host \S+\)\. Start every node with the same overrides\."
    )
    for err in outputs:
        found = refusal.search(err)
        assert found and found.group(1) != found.group(2), err
        assert "Traceback" not in err
    # No training step ran: no metrics, no checkpoint; both nodes' logs are kept.
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "checkpoints").exists()
    assert len(list(run_dir.glob("logs/node-*/workerlog.0"))) == 2
    assert job_processes(run_dir) == ""
