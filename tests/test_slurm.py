"""SLURM without a cluster: what ftlab would submit, and what each node makes of its job.

There is no SLURM here. ``sbatch``, ``srun``, ``sacct`` and ``scontrol`` are replaced by
small scripts on ``PATH``, so the real ``ftlab -m hydra/launcher=slurm_multinode ...`` path
(Hydra, hydra-submitit-launcher, submitit) runs up to the submission and the plain
``sbatch launch/slurm_multinode.sbatch`` script runs up to ``ftlab``; the node-side
resolution of ``launch.master=slurm`` gets the environment an srun task would get. One
slow test lets a stand-in SLURM run the submitted job on this machine, two tasks as two
nodes.
What they are asserted against is what ``launch/multinode.sh`` needs on every node: the
same ``launch.nnodes``, the same ``launch.master`` (the first node), the same run dir,
one ftlab per node, and GPUs per node = the layout's processes per node.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, compose_run, free_port

from ftlab.config.derived import Derived
from ftlab.distributed.launch import check_launch, launch_command
from ftlab.distributed.slurm import expand_nodelist, slurm_master
from ftlab.errors import ConfigError

BIN = Path(sys.executable).parent
JOB_ID = "4242"
# What SLURM sets in each task of a two-node job step (only the task's own ids differ).
TASK_ENV = {
    "SLURM_JOB_ID": JOB_ID,
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "2",
}
TASKS = [
    {**TASK_ENV, "SLURM_PROCID": str(n), "SLURM_NODEID": str(n), "SLURMD_NODENAME": host}
    for n, host in enumerate(("gpu01", "gpu02"))
]
TWO_NODES = ["parallel=dp8", "launch.nnodes=2"]


@pytest.mark.fast
@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("n1", ["n1"]),
        ("a,b", ["a", "b"]),
        ("gpu[01-02,05]", ["gpu01", "gpu02", "gpu05"]),
        ("gpu[8-10],cpu-a.x", ["gpu8", "gpu9", "gpu10", "cpu-a.x"]),
        ("r[1-2]n[07-08]", ["r1n07", "r1n08", "r2n07", "r2n08"]),
    ],
)
def test_nodelist_expands_like_scontrol(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.fast
@pytest.mark.parametrize(
    "nodelist,why",
    [
        ("", "'' is not a host name"),
        ("a,", "'' is not a host name"),
        ("gpu[01-02", "unclosed"),
        ("gpu[a]", "'a' is not N or N-M"),
        ("gpu[3-1]", "runs backwards"),
        ("a]b", "unbalanced brackets"),
    ],
)
def test_unreadable_nodelist_is_refused(nodelist: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"SLURM_JOB_NODELIST='.*' \(.*{why}.*launch\.master"):
        expand_nodelist(nodelist)


@pytest.mark.fast
def test_every_node_resolves_the_same_master() -> None:
    run = compose_run([*TWO_NODES, "launch.master=slurm"])
    resolved = [slurm_master(run, env).launch for env in TASKS]
    # The first node, and a port of this job: 20000 + 4242 % 10000.
    assert [lc.master for lc in resolved] == ["gpu01:24242", "gpu01:24242"]
    assert all(lc.nnodes == 2 for lc in resolved)
    run = slurm_master(run, TASKS[1])
    check_launch(run)  # the resolved value is a HOST:PORT Paddle's launcher accepts
    derived = Derived(
        "gpu", world_size=16, nproc_per_node=8, data_parallel_degree=16, global_batch_size=256
    )
    cmd = launch_command(run, derived, Path("/shared/run"), [], None)
    assert cmd[cmd.index("--master") + 1] == "gpu01:24242"
    assert cmd[cmd.index("--nnodes") + 1] == "2"
    fixed = compose_run([*TWO_NODES, "launch.master=slurm:8090"])
    assert slurm_master(fixed, TASKS[0]).launch.master == "gpu01:8090"
    other = compose_run([*TWO_NODES, "launch.master=10.0.0.1:8090"])
    assert slurm_master(other, {}) is other  # only launch.master=slurm reads SLURM


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides,env,message",
    [
        ([], {}, "launch.master=slurm: this process is not in a SLURM job"),
        (["launch.nnodes=4"], TASK_ENV, r"launch.nnodes=4 but this SLURM job has 2 node\(s\)"),
        ([], {**TASK_ENV, "SLURM_NTASKS": "16"}, "runs 16 tasks on 2 node.*one task per node"),
        ([], {**TASK_ENV, "SLURM_JOB_NUM_NODES": "3"}, "2 hosts but SLURM_JOB_NUM_NODES=3"),
        (["launch.master=slurm:99999"], TASK_ENV, "the port must be 1-65535"),
    ],
)
def test_slurm_master_that_cannot_form_the_job(
    overrides: list[str], env: dict[str, str], message: str
) -> None:
    run = compose_run([*TWO_NODES, "launch.master=slurm", *overrides])
    with pytest.raises(ConfigError, match=message):
        slurm_master(run, env)


def _no_slurm_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PADDLE_"))}


def test_launch_master_slurm_outside_slurm_fails_before_launching(tmp_path: Path) -> None:
    proc = subprocess.run(
        [BIN / "ftlab", "parallel=dp2", "parallel.nproc_per_node=1", "launch.nnodes=2"]
        + ["launch.master=slurm", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_no_slurm_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("ftlab: error: launch.master=slurm: this process is not in a SLURM job")
    )
    assert not (tmp_path / "run" / "logs").exists()  # no worker was started


# --------------------------------------------------------------------------- fake SLURM


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
    """An environment whose PATH starts with ``scripts`` (name -> sh body)."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return {**_no_slurm_env(), "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}"}


def sbatch_lines(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines -> {key: value} (flags without a value -> "")."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            out[key] = value
    return out


@pytest.mark.fast
def test_submitit_sbatch_for_a_two_node_job(tmp_path: Path) -> None:
    """The script ``ftlab -m hydra/launcher=slurm_multinode`` hands to sbatch, for a sweep of
    two jobs of two 8-GPU nodes each; the submission stops there (no SLURM runs it)."""
    captured = tmp_path / "submitted.sh"
    env = _fake_bin(
        tmp_path,
        {
            # submitit submits with `sbatch FILE` and reads the job id from the answer.
            "sbatch": f'cp "$1" {captured}\necho "Submitted batch job {JOB_ID}"\n',
            "srun": "exit 1\n",  # submitit only checks that srun exists
            # submitit then polls sacct until the job ends: pending for ever here.
            "sacct": f"printf 'JobID|State|NodeList\\n{JOB_ID}|PENDING|None\\n'\n",
        },
    )
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        [BIN / "ftlab", "-m", "hydra/launcher=slurm_multinode", "hydra.launcher.partition=gpu"]
        + [*TWO_NODES, "launch.master=slurm", "model=llama3", "precision=bf16"]
        + ["method=lora,qlora", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not captured.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert captured.exists(), proc.communicate(timeout=30)[0] if proc.poll() else "timeout"
    finally:
        proc.send_signal(signal.SIGTERM)  # stop waiting for a job that will never run
        output = proc.communicate(timeout=60)[0]
    script = captured.read_text()
    sbatch = sbatch_lines(script)
    # Each sweep point is one array element, i.e. one SLURM job of its own nodes.
    assert sbatch["array"] == "0-1%2"
    assert sbatch["nodes"] == "2"  # = launch.nnodes
    assert sbatch["ntasks-per-node"] == "1"  # one ftlab per node (it starts the workers)
    assert sbatch["gpus-per-node"] == "8"  # = parallel=dp8's processes per node
    assert sbatch["partition"] == "gpu"
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun)
    # srun starts the job's nodes x tasks-per-node tasks: no task count of its own.
    assert not {"-n", "--ntasks", "-N", "--nodes"} & set(argv), srun
    # ... each running submitit's job runner on this environment's Python.
    assert argv[-4:] == ["-u", "-m", "submitit.core._submit", f"{sweep_dir}/.submitit/%j"]
    assert Path(argv[-5]).parent == BIN
    # Every task of array element N runs the same pickled job: the same overrides (with
    # launch.master=slurm, resolved on each node from its SLURM environment) and the same
    # job dir under the sweep dir, so all nodes write one run dir.
    for num, method in enumerate(("lora", "qlora")):
        launcher, overrides, job_num = _submitted_job(sweep_dir, num)
        assert job_num == num
        assert f"method={method}" in overrides
        assert {"launch.nnodes=2", "launch.master=slurm", "parallel=dp8"} <= set(overrides)
        assert Path(str(launcher.config.hydra.sweep.dir)) == sweep_dir
    assert "stopped by SIGTERM" in output, output[-3000:]


def _submitted_job(sweep_dir: Path, num: int):
    """(the pickled launcher, the job's overrides, its job number) of array element num."""
    from submitit.core.utils import DelayedSubmission

    (pickle,) = (sweep_dir / ".submitit" / f"{JOB_ID}_{num}").glob("*_submitted.pkl")
    job = DelayedSubmission.load(pickle)
    overrides, _job_dir_key, job_num, _job_id, _singletons = job.args
    return job.function, list(overrides), job_num


@pytest.mark.fast
def test_plain_sbatch_script_gives_every_node_the_same_job(tmp_path: Path) -> None:
    """``launch/slurm_multinode.sbatch`` under a fake sbatch: what each node's ftlab gets."""
    calls = tmp_path / "calls"
    env = _fake_bin(
        tmp_path,
        {
            "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "gpu01\\ngpu02\\n"\n',
            # srun starts one task per node; each runs multinode.sh with its task ids.
            "srun": "shift  # --kill-on-bad-exit=1\n"
            'for n in 0 1; do SLURM_PROCID=$n SLURM_NODEID=$n "$@" || exit $?; done\n',
            # multinode.sh ends in `exec ftlab ...`: record what it got.
            "ftlab": f'echo "$SLURM_PROCID $*" >> {calls}\n',
        },
    )
    env.update(
        {
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_SUBMIT_DIR": str(REPO),
        }
    )
    script = (REPO / "launch" / "slurm_multinode.sbatch").read_text()
    sbatch = sbatch_lines(script)
    assert (sbatch["nodes"], sbatch["ntasks-per-node"], sbatch["gpus-per-node"]) == ("2", "1", "8")
    user = ["model=llama3", "method=lora", "parallel=dp8", "precision=bf16"]
    proc = subprocess.run(
        ["bash", REPO / "launch" / "slurm_multinode.sbatch", *user],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    expected = [
        "launch.nnodes=2",
        "launch.master=gpu01:8090",
        f"hydra.run.dir={tmp_path}/outputs/slurm/{JOB_ID}",
        *user,
    ]
    assert lines == [f"{n} {' '.join(expected)}" for n in (0, 1)]


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["launch.master=10.0.0.1:8090"],
            "launch.master=10.0.0.1:8090 with hydra/launcher=slurm_multinode: SLURM picks "
            "the nodes when the job starts",
        ),
        (
            ["launch.master=slurm", "parallel=auto"],
            "parallel=auto with hydra/launcher=slurm_multinode: the layout is chosen on the "
            "node, so the GPUs to ask for are unknown. Set parallel.nproc_per_node",
        ),
    ],
)
def test_slurm_multinode_refuses_at_submission(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    submitted = tmp_path / "submitted.sh"
    env = _fake_bin(
        tmp_path, {"sbatch": f'cp "$1" {submitted}\necho "Submitted batch job 1"\n', "srun": ""}
    )
    proc = subprocess.run(
        [BIN / "ftlab", "-m", "hydra/launcher=slurm_multinode", "launch.nnodes=2", *overrides]
        + ["method=lora,qlora", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ftlab: error: {message}")
    assert not submitted.exists()  # nothing was queued


# A stand-in for SLURM that runs what it is given on this machine: sbatch starts the batch
# script in the background (submitit writes the job's pickle only after sbatch answers)
# with the environment SLURM gives a two-node job, and srun starts one task per "node",
# each with its own task ids. The nodes are 127.0.0.1 and 127.0.0.2 (both loopback).
FAKE_SBATCH = """cp "$1" "$FAKE_SLURM/submitted.sh"
SLURM_JOB_ID={job} SLURM_JOB_NODELIST='127.0.0.[1-2]' SLURM_JOB_NUM_NODES=2 \\
  SLURM_NNODES=2 SLURM_SUBMIT_DIR="$PWD" nohup bash "$1" > "$FAKE_SLURM/batch.log" 2>&1 &
echo "Submitted batch job {job}"
"""
FAKE_SRUN = """while :; do case "$1" in --unbuffered) shift;; --output|--error) shift 2;;
  *) break;; esac; done
for n in 0 1; do
  SLURM_PROCID=$n SLURM_NODEID=$n SLURM_LOCALID=0 SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 \\
    "$@" > "$FAKE_SLURM/task$n.log" 2>&1 &
done
wait
"""


@pytest.mark.slow  # two ftlab nodes, each with Paddle's launcher and a worker (~60-90 s)
@pytest.mark.distributed
def test_submitit_two_node_job_forms_one_paddle_job(tmp_path: Path) -> None:
    """The whole hydra/launcher=slurm_multinode path with SLURM faked on this machine: the
    two SLURM tasks each run the pickled job, read the master from their SLURM environment
    and form one data-parallel job of two nodes in one run dir."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    env = _fake_bin(
        tmp_path,
        {
            "sbatch": FAKE_SBATCH.format(job=JOB_ID),
            "srun": FAKE_SRUN,
            "sacct": f"printf 'JobID|State|NodeList\\n{JOB_ID}|RUNNING|127.0.0.[1-2]\\n'\n",
        },
    )
    env["FAKE_SLURM"] = str(fake)
    sweep_dir = tmp_path / "sweep"
    port = free_port()
    proc = subprocess.run(
        [BIN / "ftlab", "-m", "hydra/launcher=slurm_multinode", "hydra.launcher.timeout_min=10"]
        + ["parallel=dp2", "parallel.nproc_per_node=1", "launch.nnodes=2"]
        + [f"launch.master=slurm:{port}", "train.max_steps=3", "train.logging_steps=1"]
        + ["eval.demo_metric=false", "device=cpu", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(fake.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    assert sbatch_lines((fake / "submitted.sh").read_text())["nodes"] == "2"
    (run_dir,) = sweep_dir.glob("0_*")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed", status
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2 and summary["steps"] == 3
    # Both nodes' launchers worked in the one run dir, each keeping its workers' logs.
    node_dirs = sorted(p for p in (run_dir / "logs").glob("node-*") if p.is_dir())
    assert len(node_dirs) == 2 and all((d / "workerlog.0").is_file() for d in node_dirs)
    assert sorted(p.name for p in (run_dir / "logs").glob("train.*.log")) == [
        "train.0.log",
        "train.1.log",
    ]
    # Each node's launcher (both log to the run's train.log) resolved launch.master=slurm
    # to the fake job's first node and the given port.
    launches = [
        line for line in (run_dir / "train.log").read_text().splitlines() if "launching" in line
    ]
    assert len(launches) == 2, launches
    assert all(f"--nnodes 2 --master 127.0.0.1:{port} " in line for line in launches), launches
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [r["status"] for r in rows] == ["completed"]
